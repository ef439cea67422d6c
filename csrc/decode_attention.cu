// KV-cache decode attention (split-KV + combine) in fp16/bf16 at head dim 64, 128, 256 with
// per-sequence lengths and an optional left window; fp32 and other head dims are routed to Triton
// by fastlm/cuda/attention.py.
//
// Decode. Block (query head h, batch b, split s) of 4 warps covers keys [s*chunk, (s+1)*chunk)
// of sequence b (chunk = ceil(L_b / splits) rounded up to 32). A warp takes 32 keys at a time,
// one key per lane: the lane reads its key row and forms the Sq dot products against q in shared
// memory, the warp updates the online softmax per token, then walks the 32 keys again reading V
// rows coalesced (each lane owns D/32 output columns). The 4 warps merge in a fixed order through
// shared memory and write an fp32 partial (normalised O and log2-domain LSE); the combine kernel
// merges the splits per row: O = sum_s 2^(lse_s - M) O_s / sum_s 2^(lse_s - M).

#include <array>
#include <cmath>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr int kDecThreads = 128;
constexpr int kDecWarps = kDecThreads / 32;

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const int* lens;
  float* o_part;  // (splits, B, Hq, Sq, D) fp32
  float* l_part;  // (splits, B, Hq, Sq) fp32, log2 domain
  int64_t sq[3], sk[3], sv[3];
  int B, Hq, group, Sq, S_max, splits, left, right;  // right <= 0 (decode is causal)
  bool has_left;
  float scale_log2;
};

// Split blocks: grid x = b * Hq + h (2^31 - 1 blocks), grid y = the split (at most 65535).
struct DecodeBlock {
  int b, h;
};

__host__ __device__ __forceinline__ DecodeBlock decode_block(int index, int Hq) {
  return {index / Hq, index % Hq};
}

// Resident blocks per SM the split kernel is compiled for; ptxas then caps the registers at
// 65536 / (128 n): 64 at SQ = 1; 96 (D = 64) or 128 at SQ = 4; 168 (D = 64) or 255 at SQ = 16 (acc
// alone holds SQ * D / 32 floats). Each instantiation fits its cap without spilling, where ptxas's
// own default target spilled some.
template <int D, int SQ>
constexpr int decode_min_blocks() {
  return SQ == 1 ? 8 : SQ <= 4 ? (D == 64 ? 5 : 4) : (D == 64 ? 3 : 1);
}

template <typename T, int D, int SQ>
__global__ void __launch_bounds__(kDecThreads, decode_min_blocks<D, SQ>()) decode_split_kernel(DecodeParams p) {
  constexpr int CPL = D / 32;  // output columns per lane
  __shared__ __align__(16) float qs[SQ][D];
  __shared__ __align__(16) float buf[SQ][D];
  __shared__ float wm[kDecWarps][SQ];
  __shared__ float wl[kDecWarps][SQ];

  const DecodeBlock blk = decode_block(static_cast<int>(blockIdx.x), p.Hq);
  const int b = blk.b;
  const int h = blk.h;
  const int split = blockIdx.y;
  const int hk = h / p.group;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int Sq = p.Sq;
  const int L = min_of(max_of(p.lens[b], 0), p.S_max);
  const int chunk = ceil_div(ceil_div(L, p.splits), 32) * 32;
  const int start = split * chunk;
  const int end = min_of(start + chunk, L);
  int lo = start;
  if (p.has_left) lo = max_of(start, L - Sq - p.left);

  const T* Q = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* K = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
  const T* V = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];
  for (int i = threadIdx.x; i < SQ * D; i += kDecThreads) {
    const int t = i / D;
    const int d = i % D;
    qs[t][d] = t < Sq ? to_float(Q[t * p.sq[2] + d]) * p.scale_log2 : 0.f;
    buf[t][d] = 0.f;
  }
  __syncthreads();

  float m[SQ], lsum[SQ], acc[SQ][CPL];
#pragma unroll
  for (int t = 0; t < SQ; ++t) {
    m[t] = kNegInf;
    lsum[t] = 0.f;
#pragma unroll
    for (int e = 0; e < CPL; ++e) acc[t][e] = 0.f;
  }

  for (int base = lo + warp * 32; base < end; base += kDecWarps * 32) {
    const int key = base + lane;
    float s[SQ];
#pragma unroll
    for (int t = 0; t < SQ; ++t) s[t] = 0.f;
    if (key < end) {
      const T* kr = K + static_cast<int64_t>(key) * p.sk[2];
#pragma unroll 4
      for (int d0 = 0; d0 < D; d0 += 8) {
        float kv[8];
        load_float<T, 8>(kr + d0, kv);
#pragma unroll
        for (int t = 0; t < SQ; ++t) {
#pragma unroll
          for (int e = 0; e < 8; ++e) s[t] = fmaf(qs[t][d0 + e], kv[e], s[t]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < SQ; ++t) {
      if (t >= Sq) break;
      const int diag = L - Sq + t;
      const bool ok = key < end && key <= diag + p.right && (!p.has_left || key >= diag - p.left);
      const float x = ok ? s[t] : kNegInf;
      const float m_new = fmaxf(m[t], warp_max(x));
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = exp2f(m[t] - m_use);
      s[t] = exp2f(x - m_use);  // s now holds the probabilities
      lsum[t] = lsum[t] * alpha + s[t];
      m[t] = m_new;
#pragma unroll
      for (int e = 0; e < CPL; ++e) acc[t][e] *= alpha;
    }
    const int count = min_of(32, end - base);
    for (int kk = 0; kk < count; ++kk) {
      float vv[CPL];
      load_float<T, CPL>(V + static_cast<int64_t>(base + kk) * p.sv[2] + lane * CPL, vv);
#pragma unroll
      for (int t = 0; t < SQ; ++t) {
        if (t >= Sq) break;
        const float pk = __shfl_sync(0xffffffffu, s[t], kk);
#pragma unroll
        for (int e = 0; e < CPL; ++e) acc[t][e] = fmaf(pk, vv[e], acc[t][e]);
      }
    }
  }

  // Merge the warps in a fixed order: M = max_w m_w, O = sum_w 2^(m_w - M) O_w, l likewise.
#pragma unroll
  for (int t = 0; t < SQ; ++t) {
    const float l = warp_sum(lsum[t]);
    if (lane == 0) {
      wm[warp][t] = m[t];
      wl[warp][t] = l;
    }
  }
  __syncthreads();
  float scale_w[SQ];
#pragma unroll
  for (int t = 0; t < SQ; ++t) {
    float mm = kNegInf;
    for (int w = 0; w < kDecWarps; ++w) mm = fmaxf(mm, wm[w][t]);
    const float m_use = mm == kNegInf ? 0.f : mm;
    scale_w[t] = exp2f(m[t] - m_use);
  }
  for (int w = 0; w < kDecWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int t = 0; t < SQ; ++t) {
#pragma unroll
        for (int e = 0; e < CPL; ++e) buf[t][lane * CPL + e] += acc[t][e] * scale_w[t];
      }
    }
    __syncthreads();
  }
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * Sq;
  for (int i = threadIdx.x; i < Sq * D; i += kDecThreads) {
    const int t = i / D;
    const int d = i % D;
    float mm = kNegInf;
    for (int w = 0; w < kDecWarps; ++w) mm = fmaxf(mm, wm[w][t]);
    const float m_use = mm == kNegInf ? 0.f : mm;
    float l = 0.f;
    for (int w = 0; w < kDecWarps; ++w) l += wl[w][t] * exp2f(wm[w][t] - m_use);
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * Sq + t;
    const int64_t prow = static_cast<int64_t>(split) * rows + row;
    p.o_part[prow * D + d] = l > 0.f ? buf[t][d] / l : 0.f;
    if (d == 0) p.l_part[prow] = l > 0.f ? mm + log2f(l) : kNegInf;
  }
}

struct CombineParams {
  const float* o_part;
  const float* l_part;
  void* o;
  float* lse;
  int64_t so[3], sl[2];
  int Hq, Sq, splits;
  int64_t rows;
};

// Merges the split partials of row (b, h, t) = `row`; one warp, lane `lane`.
template <typename T, int D>
__device__ __forceinline__ void combine_row(const CombineParams& p, int64_t row, int lane) {
  constexpr int CPL = D / 32;
  float mm = kNegInf;
  for (int s = 0; s < p.splits; ++s) mm = fmaxf(mm, p.l_part[s * p.rows + row]);
  const float m_use = mm == kNegInf ? 0.f : mm;
  float total = 0.f;
  float acc[CPL];
#pragma unroll
  for (int e = 0; e < CPL; ++e) acc[e] = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    const int64_t prow = s * p.rows + row;
    const float w = exp2f(p.l_part[prow] - m_use);
    total += w;
    if (w > 0.f) {
#pragma unroll
      for (int e = 0; e < CPL; ++e) acc[e] = fmaf(w, p.o_part[prow * D + e * 32 + lane], acc[e]);
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const int64_t b = row / (static_cast<int64_t>(p.Hq) * p.Sq);
  const int64_t h = (row / p.Sq) % p.Hq;
  const int64_t t = row % p.Sq;
  T* orow = static_cast<T*>(p.o) + b * p.so[0] + h * p.so[1] + t * p.so[2];
#pragma unroll
  for (int e = 0; e < CPL; ++e) orow[e * 32 + lane] = from_float<T>(acc[e] * inv);
  if (lane == 0) p.lse[b * p.sl[0] + h * p.sl[1] + t] = total > 0.f ? (mm + log2f(total)) * kLn2 : kNegInf;
}

// One warp per row, grid-stride over the rows (B * Hq * Sq may exceed kDecWarps * (2^31 - 1)).
template <typename T, int D>
__global__ void __launch_bounds__(kDecThreads) decode_combine_kernel(CombineParams p) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kDecWarps + threadIdx.x / 32; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kDecWarps) {
    combine_row<T, D>(p, row, lane);
  }
}

}  // namespace

bool decode_attention_supported(int64_t D, int dtype) {
  return (D == 64 || D == 128 || D == 256) && (dtype == kFloat16 || dtype == kBFloat16);
}

std::vector<std::array<int64_t, 3>> decode_attention_grids(int64_t B, int64_t Hq, int64_t Sq, int64_t num_splits) {
  if (B < 1 || Hq < 1 || Sq < 1 || Sq > 16 || num_splits < 1 || num_splits > kMaxGridYZ) return {};
  const int64_t bh = mul_within(B, Hq, kMaxGridX);
  if (bh < 0) return {};
  return {{bh, num_splits, 1}, {min_of(ceil_div<int64_t>(bh * Sq, kDecWarps), kMaxGridX), 1, 1}};
}

std::array<int64_t, 2> decode_attention_block(int64_t index, int64_t Hq) {
  if (index < 0 || index > kMaxGridX || Hq < 1 || Hq > kMaxGridX) return {-1, -1};
  const DecodeBlock blk = decode_block(static_cast<int>(index), static_cast<int>(Hq));
  return {blk.b, blk.h};
}

int decode_attention_fwd(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t cache_seqlens, uintptr_t out,
                         uintptr_t lse, uintptr_t o_part, uintptr_t lse_part, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t Sq, int64_t S_max, int64_t D, const std::vector<int64_t>& strides, int64_t num_splits,
                         double scale, int64_t window_left, int64_t window_right, int dtype, uintptr_t stream) {
  if (strides.size() != 14 || Hkv <= 0 || Hq % Hkv != 0 || Sq < 1 || Sq > 16 || num_splits < 1 ||
      num_splits > 65535 || !decode_attention_supported(D, dtype))
    return cudaErrorInvalidValue;
  if (B == 0 || Hq == 0) return cudaSuccess;
  const auto grids = decode_attention_grids(B, Hq, Sq, num_splits);
  if (grids.empty() || S_max > INT32_MAX / 2) return cudaErrorInvalidValue;
  for (int i = 3; i < 9; ++i) {
    if (strides[i] % 8 != 0) return cudaErrorInvalidValue;  // 16-byte K/V rows
  }
  for (uintptr_t ptr_v : {k_cache, v_cache}) {
    if (!aligned_to(ptr_v, 16)) return cudaErrorInvalidValue;
  }
  DecodeParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k_cache);
  p.v = reinterpret_cast<const void*>(v_cache);
  p.lens = reinterpret_cast<const int*>(cache_seqlens);
  p.o_part = reinterpret_cast<float*>(o_part);
  p.l_part = reinterpret_cast<float*>(lse_part);
  for (int i = 0; i < 3; ++i) {
    p.sq[i] = strides[i];
    p.sk[i] = strides[3 + i];
    p.sv[i] = strides[6 + i];
  }
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.group = static_cast<int>(Hq / Hkv);
  p.Sq = static_cast<int>(Sq);
  p.S_max = static_cast<int>(S_max);
  p.splits = static_cast<int>(num_splits);
  p.has_left = window_left >= 0;
  p.left = static_cast<int>(max_of<int64_t>(min_of<int64_t>(window_left, INT32_MAX / 2), 0));
  p.right = window_right < 0 ? 0 : static_cast<int>(min_of<int64_t>(window_right, 0));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  CombineParams cp{};
  cp.o_part = p.o_part;
  cp.l_part = p.l_part;
  cp.o = reinterpret_cast<void*>(out);
  cp.lse = reinterpret_cast<float*>(lse);
  for (int i = 0; i < 3; ++i) cp.so[i] = strides[9 + i];
  cp.sl[0] = strides[12];
  cp.sl[1] = strides[13];
  cp.Hq = p.Hq;
  cp.Sq = p.Sq;
  cp.splits = p.splits;
  cp.rows = B * Hq * Sq;
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid = to_dim3(grids[0]);
  const dim3 cgrid = to_dim3(grids[1]);
  return dispatch_half(dtype, [&](auto tt) -> int {
    using T = typename decltype(tt)::type;
    return dispatch_dim<64, 128, 256>(D, [&](auto dd) -> int {
      constexpr int kD = decltype(dd)::value;
      auto split = [&](auto sqc) -> int {
        return launch(decode_split_kernel<T, kD, decltype(sqc)::value>, grid, dim3(kDecThreads), st, p);
      };
      int code;
      if (Sq == 1) {
        code = split(std::integral_constant<int, 1>{});
      } else if (Sq <= 4) {
        code = split(std::integral_constant<int, 4>{});
      } else {
        code = split(std::integral_constant<int, 16>{});
      }
      if (code != cudaSuccess) return code;
      return launch(decode_combine_kernel<T, kD>, cgrid, dim3(kDecThreads), st, cp);
    });
  });
}

}  // namespace fastlm
