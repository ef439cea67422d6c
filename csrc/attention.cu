// Fused attention forward (FlashAttention-2 style, tensor-core mma.sync). fp16/bf16 at head dim
// 64 and 128, causal (bottom-right aligned) or not, GQA/MQA, writing O and the log-sum-exp.
// The KV-cache decode is csrc/decode_attention.cu. Everything else (fp32, other head dims,
// sliding windows in the forward, the backward) is routed to Triton by
// fastlm/cuda/attention.py; the launchers here return cudaErrorInvalidValue for it.
//
// Forward. One block (4 warps) owns kBM = 64 query rows of one (batch, query head); warp w owns
// rows 16w..16w+15 and keeps them in mma A fragments. For each block of kBN = 64 keys (K and V
// staged in shared memory) a warp computes S = Q K^T with mma.m16n8k16 (fp32 accumulate), scales
// it to log2 units, masks it, and updates the online softmax:
//     m' = max(m, rowmax S),  P = 2^(S - m'),  l' = l 2^(m - m') + rowsum P,  O' = O 2^(m - m') + P V
// The S accumulator fragments are reused as the A operand of P V (the C layout of two adjacent
// n8 tiles equals the A layout of one k16 chunk), so P never leaves registers. Rows are split over
// the 4 lanes of a quad; their maxima and sums are combined with two xor shuffles. At the end
// O /= l and LSE = (m + log2 l) ln 2; a row that saw no key gets O = 0, LSE = -inf.
// Trade-off: K/V tiles are loaded synchronously (no cp.async pipeline) and V's B fragments are
// gathered with 16-bit shared loads instead of ldmatrix.trans: simpler to verify, not peak speed.
//
// The mma.m16n8k16 fragment layout is in csrc/common.h (mma_m16n8k16).
//

#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

// ---- primitives ------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ uint16_t bits16(T v) {
  uint16_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

// Two elements of T (lo at the lower column / k index) in one 32-bit mma operand register.
template <typename T>
__device__ __forceinline__ uint32_t pack_raw(T lo, T hi) {
  return static_cast<uint32_t>(bits16(lo)) | (static_cast<uint32_t>(bits16(hi)) << 16);
}

template <typename T>
__device__ __forceinline__ uint32_t pack_float(float lo, float hi) {
  return pack_raw(from_float<T>(lo), from_float<T>(hi));
}

// 32-bit shared-memory load of two consecutive elements (callers keep p 4-byte aligned).
template <typename T>
__device__ __forceinline__ uint32_t lds32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---- forward ---------------------------------------------------------------------------------

constexpr int kBM = 64;  // query rows per block (16 per warp)
constexpr int kBN = 64;  // keys per iteration
constexpr int kFwdThreads = 128;

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  int64_t sq[3], sk[3], sv[3], so[3];  // (b, h, s) element strides; d is unit-stride
  int64_t sl[2];                       // lse (b, h); s is unit-stride
  int Hq, group, Sq, Sk;
  int mblocks;       // query blocks per (batch, head): ceil(Sq / kBM)
  float scale_log2;  // scale * log2(e)
};

// The forward's blocks lie on grid x (2^31 - 1 blocks; y and z stop at 65535): block index
// (b * Hq + h) * mblocks + i owns query block i of (b, h), or mblocks - 1 - i when causal (the
// longest key ranges start first).
struct FwdBlock {
  int b, h, mblk;
};

__host__ __device__ __forceinline__ FwdBlock fwd_block(int index, int Hq, int mblocks, bool causal) {
  const int bh = index / mblocks;
  const int i = index - bh * mblocks;
  return {bh / Hq, bh % Hq, causal ? mblocks - 1 - i : i};
}

// Rows [row0, row0 + ROWS) of a (S, D) matrix with row stride `stride` into shared memory with row
// stride LD, 16 bytes per access; rows at or beyond S are zero-filled.
template <typename T, int D, int ROWS, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int row0, int S) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < ROWS * kChunks; i += kFwdThreads) {
    const int r = i / kChunks;
    const int c = (i % kChunks) * 8;
    Pack<T, 8> pk;
    if (row0 + r < S) {
      pk = *reinterpret_cast<const Pack<T, 8>*>(src + static_cast<int64_t>(row0 + r) * stride + c);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) pk.v[j] = from_float<T>(0.f);
    }
    *reinterpret_cast<Pack<T, 8>*>(dst + r * LD + c) = pk;
  }
}

// At least 1 block per SM: registers up to 255. ptxas's default target (128 at D = 64 on sm_90a)
// spilled; the tile needs about 160 (D = 64, 3 blocks per SM) or 215 (D = 128, 2 blocks).
template <typename T, int D, bool CAUSAL>
__global__ void __launch_bounds__(kFwdThreads, 1) attention_fwd_kernel(FwdParams p) {
  constexpr int LD = D + 8;  // padded row stride: rows 16 bytes apart modulo 128, no bank conflicts
  constexpr int KC = D / 16;  // k16 chunks of the head dim
  constexpr int NT = kBN / 8;  // n8 tiles of S
  constexpr int DT = D / 8;    // n8 tiles of O
  FASTLM_DYN_SMEM(smem);
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + kBM * LD;
  T* Vs = Ks + kBN * LD;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;
  const int c = lane & 3;
  const FwdBlock blk = fwd_block(static_cast<int>(blockIdx.x), p.Hq, p.mblocks, CAUSAL);
  const int b = blk.b;
  const int h = blk.h;
  const int hk = h / p.group;
  const int m0 = blk.mblk * kBM;

  const T* Q = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* K = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
  const T* V = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];
  T* O = static_cast<T*>(p.o) + b * p.so[0] + h * p.so[1];
  float* L = p.lse + b * p.sl[0] + h * p.sl[1];

  load_tile<T, D, kBM, LD>(Qs, Q, p.sq[2], m0, p.Sq);
  __syncthreads();
  const int r0 = warp * 16 + g;  // this lane's rows in the block: r0 and r0 + 8
  uint32_t qf[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
    qf[kc][0] = lds32(Qs + r0 * LD + kc * 16 + 2 * c);
    qf[kc][1] = lds32(Qs + (r0 + 8) * LD + kc * 16 + 2 * c);
    qf[kc][2] = lds32(Qs + r0 * LD + kc * 16 + 8 + 2 * c);
    qf[kc][3] = lds32(Qs + (r0 + 8) * LD + kc * 16 + 8 + 2 * c);
  }

  float o[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float m_row[2] = {kNegInf, kNegInf};
  float l_row[2] = {0.f, 0.f};
  const int diag = p.Sk - p.Sq;  // query i sees keys j <= i + diag (causal)
  const int qi0 = m0 + r0;  // this lane's query rows: qi0 and qi0 + 8
  const int n_end = CAUSAL ? min_of(p.Sk, m0 + kBM + diag) : p.Sk;

  for (int n0 = 0; n0 < n_end; n0 += kBN) {
    __syncthreads();  // every warp is done reading the previous K/V tiles
    load_tile<T, D, kBN, LD>(Ks, K, p.sk[2], n0, p.Sk);
    load_tile<T, D, kBN, LD>(Vs, V, p.sv[2], n0, p.Sk);
    __syncthreads();

    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const T* kr = Ks + (j * 8 + g) * LD + 2 * c;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) mma_m16n8k16<T>(s[j], qf[kc], lds32(kr + kc * 16), lds32(kr + kc * 16 + 8));
    }

    const bool need_mask = n0 + kBN > p.Sk || (CAUSAL && n0 + kBN - 1 > m0 + diag);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float x = s[j][i] * p.scale_log2;
        if (need_mask) {
          const int key = n0 + j * 8 + 2 * c + (i & 1);
          if (key >= p.Sk || (CAUSAL && key > qi0 + 8 * (i >> 1) + diag)) x = kNegInf;
        }
        s[j][i] = x;
      }
    }

    float m_new[2] = {m_row[0], m_row[1]};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      m_new[0] = fmaxf(m_new[0], fmaxf(s[j][0], s[j][1]));
      m_new[1] = fmaxf(m_new[1], fmaxf(s[j][2], s[j][3]));
    }
    float m_use[2], alpha[2], rsum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_new[r] = quad_max(m_new[r]);
      m_use[r] = m_new[r] == kNegInf ? 0.f : m_new[r];
      alpha[r] = exp2f(m_row[r] - m_use[r]);
      m_row[r] = m_new[r];
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[j][i] = exp2f(s[j][i] - m_use[i >> 1]);
        rsum[i >> 1] += s[j][i];
      }
    }
    l_row[0] = l_row[0] * alpha[0] + rsum[0];
    l_row[1] = l_row[1] * alpha[1] + rsum[1];
#pragma unroll
    for (int t = 0; t < DT; ++t) {
      o[t][0] *= alpha[0];
      o[t][1] *= alpha[0];
      o[t][2] *= alpha[1];
      o[t][3] *= alpha[1];
    }

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pack_float<T>(s[2 * kk][0], s[2 * kk][1]), pack_float<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack_float<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_float<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const T* vr = Vs + (kk * 16 + 2 * c) * LD + g;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        const T* vp = vr + t * 8;
        mma_m16n8k16<T>(o[t], a, pack_raw(vp[0], vp[LD]), pack_raw(vp[8 * LD], vp[9 * LD]));
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_row[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int qi = qi0 + 8 * r;
    if (qi < p.Sq) {
      T* orow = O + static_cast<int64_t>(qi) * p.so[2] + 2 * c;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        *reinterpret_cast<uint32_t*>(orow + t * 8) = pack_float<T>(o[t][2 * r] * inv, o[t][2 * r + 1] * inv);
      }
      if (c == 0) L[qi] = l > 0.f ? (m_row[r] + log2f(l)) * kLn2 : kNegInf;
    }
  }
}

}  // namespace

bool attention_fwd_supported(int64_t D, int dtype) { return (D == 64 || D == 128) && (dtype == kFloat16 || dtype == kBFloat16); }

std::vector<std::array<int64_t, 3>> attention_fwd_grids(int64_t B, int64_t Hq, int64_t Sq) {
  if (B < 1 || Hq < 1 || Sq < 1 || Sq > INT32_MAX - 2 * kBM) return {};
  const int64_t blocks = mul_within(mul_within(B, Hq, kMaxGridX), ceil_div<int64_t>(Sq, kBM), kMaxGridX);
  if (blocks < 0) return {};
  return {{blocks, 1, 1}};
}

std::array<int64_t, 3> attention_fwd_block(int64_t index, int64_t Hq, int64_t Sq, bool causal) {
  if (index < 0 || index > kMaxGridX || Hq < 1 || Hq > kMaxGridX || Sq < 1 || Sq > INT32_MAX - 2 * kBM) {
    return {-1, -1, -1};
  }
  const FwdBlock blk = fwd_block(static_cast<int>(index), static_cast<int>(Hq),
                                 static_cast<int>(ceil_div<int64_t>(Sq, kBM)), causal);
  return {blk.b, blk.h, blk.mblk};
}

int attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, int64_t B, int64_t Hq,
                  int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, const std::vector<int64_t>& strides, double scale,
                  bool causal, int dtype, uintptr_t stream) {
  if (strides.size() != 14 || Hkv <= 0 || Hq % Hkv != 0 || !attention_fwd_supported(D, dtype)) return cudaErrorInvalidValue;
  if (B == 0 || Hq == 0 || Sq == 0) return cudaSuccess;
  const auto grids = attention_fwd_grids(B, Hq, Sq);
  if (grids.empty() || Sk > INT32_MAX - 2 * kBN) return cudaErrorInvalidValue;
  for (int i = 0; i < 12; ++i) {
    if (strides[i] % 8 != 0) return cudaErrorInvalidValue;  // 16-byte rows for the vector loads
  }
  for (uintptr_t ptr_v : {q, k, v, out}) {
    if (!aligned_to(ptr_v, 16)) return cudaErrorInvalidValue;
  }
  FwdParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.o = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  for (int i = 0; i < 3; ++i) {
    p.sq[i] = strides[i];
    p.sk[i] = strides[3 + i];
    p.sv[i] = strides[6 + i];
    p.so[i] = strides[9 + i];
  }
  p.sl[0] = strides[12];
  p.sl[1] = strides[13];
  p.Hq = static_cast<int>(Hq);
  p.group = static_cast<int>(Hq / Hkv);
  p.Sq = static_cast<int>(Sq);
  p.Sk = static_cast<int>(Sk);
  p.mblocks = static_cast<int>(ceil_div<int64_t>(Sq, kBM));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const dim3 grid = to_dim3(grids[0]);
  const dim3 block(kFwdThreads);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_half(dtype, [&](auto tt) -> int {
    using T = typename decltype(tt)::type;
    return dispatch_dim<64, 128>(D, [&](auto dd) -> int {
      constexpr int kD = decltype(dd)::value;
      const size_t smem = static_cast<size_t>(kBM + 2 * kBN) * (kD + 8) * sizeof(T);
      return dispatch_bool(causal, [&](auto cz) -> int {
        return launch_smem(attention_fwd_kernel<T, kD, decltype(cz)::value>, grid, block, smem, st, p);
      });
    });
  });
}

}  // namespace fastlm
