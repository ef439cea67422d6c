// Fused attention forward (FlashAttention-2 style, tensor-core mma.sync) and KV-cache decode
// (split-KV + combine). fp16/bf16 forward at head dim 64 and 128, causal (bottom-right aligned)
// or not, GQA/MQA, writing O and the log-sum-exp; decode in fp16/bf16 at head dim 64, 128, 256
// with per-sequence lengths and an optional left window. Everything else (fp32, other head dims,
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
// Decode. Block (query head h, batch b, split s) of 4 warps covers keys [s*chunk, (s+1)*chunk)
// of sequence b (chunk = ceil(L_b / splits) rounded up to 32). A warp takes 32 keys at a time,
// one key per lane: the lane reads its key row and forms the Sq dot products against q in shared
// memory, the warp updates the online softmax per token, then walks the 32 keys again reading V
// rows coalesced (each lane owns D/32 output columns). The 4 warps merge in a fixed order through
// shared memory and write an fp32 partial (normalised O and log2-domain LSE); the combine kernel
// merges the splits per row: O = sum_s 2^(lse_s - M) O_s / sum_s 2^(lse_s - M).

#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr float kNegInf = -INFINITY;
constexpr float kLn2 = 0.6931471805599453f;

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

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
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

// ---- decode ----------------------------------------------------------------------------------

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

dim3 to_dim3(const std::array<int64_t, 3>& g) {
  return dim3(static_cast<unsigned>(g[0]), static_cast<unsigned>(g[1]), static_cast<unsigned>(g[2]));
}

template <typename F>
int dispatch_half(int dtype, F&& f) {
  if (dtype == kFloat16) return f(TypeTag<__half>{});
  if (dtype == kBFloat16) return f(TypeTag<__nv_bfloat16>{});
  return cudaErrorInvalidValue;
}

template <int... Ds, typename F>
int dispatch_dim(int64_t D, F&& f) {
  int code = cudaErrorInvalidValue;
  const bool hit = ((D == Ds ? (code = f(std::integral_constant<int, Ds>{}), true) : false) || ...);
  (void)hit;
  return code;
}

}  // namespace

bool attention_fwd_supported(int64_t D, int dtype) { return (D == 64 || D == 128) && (dtype == kFloat16 || dtype == kBFloat16); }

bool decode_attention_supported(int64_t D, int dtype) {
  return (D == 64 || D == 128 || D == 256) && (dtype == kFloat16 || dtype == kBFloat16);
}

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
