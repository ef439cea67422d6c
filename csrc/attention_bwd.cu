// Fused attention backward (FlashAttention-2 style, tensor-core mma.sync, no atomics). fp16/bf16 at
// head dim 64 and 128, causal and sliding windows (bottom-right aligned, as
// fastlm.reference.attention.visible_mask), GQA/MQA, any Sq/Sk, strided (b, h, s) layouts with
// unit-stride d and 16-byte aligned rows. Same conventions as the forward (csrc/attention.cu).
//
// With P_ij = 2^(scale_log2 q_i.k_j - lse2_i) (lse2 = LSE log2 e; a row with LSE = -inf gets
// lse2 = +inf, so P = 0) over the visible pairs (key j visible to query i iff lo <= j - i <= hi):
//     delta_i = sum_d dO_id O_id - dLSE_i                      (preprocess; dLSE = 0 when absent)
//     dV_j = sum_i P_ij dO_i,  dS_ij = P_ij (dO_i.v_j - delta_i),  dK_j = scale sum_i dS_ij q_i
//     dQ_i = scale sum_j dS_ij k_j
// 1. preprocess: one block per (b, q head, 64 rows) writes delta and lse2 into a workspace of rows
//    padded to a multiple of 64 (padding rows: delta 0, lse2 +inf), so the tiles below are read with
//    aligned 16-byte cp.async and rows beyond Sq need no mask (their P is 0).
// 2. dK/dV: one block per (b, kv head, 64 keys), 4 warps; warp w owns keys 16w..16w+15 and keeps
//    V (and at D = 64 also K) as mma A fragments in registers; at D = 128 K's fragments are re-read
//    from shared memory by ldmatrix each step (K, V, dK, dV in registers would take 192 of 255).
//    It loops over the group's query heads (in order) and the query blocks of BQ = 32 rows that
//    see any of its keys (blocks every pair sees run a copy of the step without the mask);
//    Q, dO, lse2, delta tiles are double-buffered with cp.async. Per block: S^T = K Q^T (Q B
//    fragments by ldmatrix), P^T, dV += P^T dO (the S^T accumulators reused as the A operand; dO by
//    ldmatrix.trans), dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q (ldmatrix.trans).
// 3. dQ: one block per (b, q head, 64 queries), warp w owns rows 16w..16w+15 (Q and dO as A
//    fragments); over the visible key blocks of BN keys (K, V double-buffered with cp.async):
//    S = Q K^T, P, dP = dO V^T, dS = P (dP - delta), dQ += dS K (K by ldmatrix.trans).
// 4. VARLEN (packed sequences, attention_varlen_bwd): the same kernels with per-sequence bounds read
//    from cu_seqlens on the device (no host sync): the grids are those of B sequences of the longest
//    lengths, blocks past a sequence's end exit, the workspace keeps the dense layout over
//    max_seqlen_q (so the cp.async tiles stay aligned), and each sequence's band lo..hi comes from its
//    own lengths (visible_band). dK/dV re-reads the sequence offsets at each step and at the end
//    instead of holding them in registers across the loop (at D = 128 there is no register left).
// 5. OPTIONS (fastlm/reference/attention.py, "Options"; one template flag, each option behind a
//    runtime test): S = c tanh(scale q.k / c) - slope |j - i - (Sk - Sq)|, P = 2^(S log2 e - lse2);
//    dropout keep_ij recomputed by Philox from the seed at the packed rows (dropout_keep_one,
//    dropout_keep_pair), dV += (P keep / (1 - p))^T dO, dS = P (dP keep / (1 - p) - delta)
//    (1 - tanh^2), the last factor only with softcap. dK/dV keeps the dropout mask as a bit per
//    element and the softcap factor beside P until dS.
// Every output element has one owner that sums in a fixed order: bit-identical results run to run.
// Trade-off: S = QK^T and dO V^T are computed in both passes (no atomics, no dQ accumulator in
// fp32 global memory); dK/dV/dQ are stored from the accumulator fragments with 32-bit stores; the
// tiles (BQ = 32, dQ's BN = 64 at D = 64 and 32 at D = 128) are the largest without spills.
//
// The mma.m16n8k16 and ldmatrix fragment layouts are in csrc/common.h.

#include <array>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr int kBwdThreads = 128;
constexpr int kPadRows = 64;    // workspace rows per (b, q head) are padded to a multiple of this
constexpr int kKeyBlock = 64;   // dK/dV: keys per block (16 per warp)
constexpr int kQueryBlock = 64; // dQ: queries per block (16 per warp)
constexpr float kLog2e = 1.4426950408889634f;

struct BwdParams {
  const void *q, *k, *v, *o, *dout;
  void *dq, *dk, *dv;
  const float* lse;
  const float* dlse;  // null when absent
  float* delta;       // workspace (B * Hq, Sq_pad)
  float* lse2;        // workspace (B * Hq, Sq_pad)
  int64_t sq[3], sk[3], sv[3], so[3], sdo[3], sdq[3], sdk[3], sdv[3];  // (b, h, s); d unit-stride
  int64_t sl[2], sdl[2];                                                // lse, dlse (b, h); s unit-stride
  int Hq, Hkv, group, Sq, Sk, Sq_pad;
  int lo, hi;     // key j is visible to query i iff lo <= j - i <= hi (clamped to [-Sq, Sk])
  int blocks;     // blocks per (b, head) of the kernel being launched
  bool reverse;   // dQ: last query block first (causal: the longest key ranges start first)
  float scale_log2, scale;
  // VARLEN: sequence b owns query rows [cu_q[b], cu_q[b + 1]) and key rows [cu_k[b], cu_k[b + 1]) of the
  // packed tensors (b strides 0); Sq, Sk above are the longest lengths (grids, workspace rows), and each
  // sequence's lo, hi follow from its lengths and the window (has_left, left, has_right, right).
  const int* cu_q;
  const int* cu_k;
  int left, right;
  bool has_left, has_right;
  // OPTIONS (fastlm/reference/attention.py, "Options"): softcap c (0: off); ALiBi slope alibi[b * alibi_sb + h]
  // (null: off); dropout with keep threshold floor(p 2^32), rp = 1 / (1 - p), seed = [seed, offset] (null: off).
  float softcap;
  const float* alibi;
  int64_t alibi_sb;
  const int64_t* seed;
  uint32_t threshold;
  float rp;
};

// The band lo <= j - i <= hi of keys visible to queries of a sequence of Sq queries and Sk keys (the window
// as fastlm.triton.attention.resolve_window), clamped to [-Sq, Sk]; nothing visible: lo = hi = Sk.
__host__ __device__ __forceinline__ void visible_band(const BwdParams& p, int64_t Sq, int64_t Sk, int& lo, int& hi) {
  const int64_t diag = Sk - Sq;
  const int64_t l = p.has_left ? diag - p.left : -Sq;
  const int64_t h = p.has_right ? diag + p.right : Sk;
  lo = static_cast<int>(min_of<int64_t>(max_of<int64_t>(l, -Sq), Sk));
  hi = static_cast<int>(min_of<int64_t>(max_of<int64_t>(h, -Sq), Sk));
  if (lo > hi) lo = hi = static_cast<int>(Sk);  // j - i == Sk never holds
}

// The sequence of batch index b: its first packed query and key rows (dense: 0, the b strides place
// it), lengths and band. Dense: read from the parameters where used (as before VARLEN existed, so
// the dense kernels' code is unchanged); VARLEN: read from cu_seqlens once per block.
template <bool VARLEN>
struct BwdSeq {
  const BwdParams& p;
  __device__ __forceinline__ int q0() const { return 0; }
  __device__ __forceinline__ int k0() const { return 0; }
  __device__ __forceinline__ int Sq() const { return p.Sq; }
  __device__ __forceinline__ int Sk() const { return p.Sk; }
  __device__ __forceinline__ int lo() const { return p.lo; }
  __device__ __forceinline__ int hi() const { return p.hi; }
};

template <>
struct BwdSeq<true> {
  int q0_, k0_, Sq_, Sk_, lo_, hi_;
  __device__ __forceinline__ int q0() const { return q0_; }
  __device__ __forceinline__ int k0() const { return k0_; }
  __device__ __forceinline__ int Sq() const { return Sq_; }
  __device__ __forceinline__ int Sk() const { return Sk_; }
  __device__ __forceinline__ int lo() const { return lo_; }
  __device__ __forceinline__ int hi() const { return hi_; }
};

template <bool VARLEN>
__device__ __forceinline__ BwdSeq<VARLEN> bwd_seq(const BwdParams& p, int b) {
  if constexpr (VARLEN) {
    BwdSeq<true> s{p.cu_q[b], p.cu_k[b], 0, 0, 0, 0};
    s.Sq_ = min_of(p.cu_q[b + 1] - s.q0_, p.Sq);  // a length beyond max_seqlen: its rows past it are not computed
    s.Sk_ = min_of(p.cu_k[b + 1] - s.k0_, p.Sk);
    visible_band(p, s.Sq_, s.Sk_, s.lo_, s.hi_);
    return s;
  } else {
    return {p};
  }
}

// VARLEN: cu[b] and the length min(cu[b + 1] - row0, max_len) read again (volatile) where used, so
// they are not held in registers across the dK/dV loop; dense: the given values.
template <bool VARLEN>
__device__ __forceinline__ int reread_row0(const int* cu, int b, int dense) {
  if constexpr (VARLEN) return *static_cast<const volatile int*>(cu + b);
  return dense;
}

template <bool VARLEN>
__device__ __forceinline__ int reread_len(const int* cu, int b, int row0, int max_len, int dense) {
  if constexpr (VARLEN) return min_of(*static_cast<const volatile int*>(cu + b + 1) - row0, max_len);
  return dense;
}

// Element offset of sequence b's rows: b * stride_b (dense), row0 * stride_s (VARLEN).
template <bool VARLEN>
__device__ __forceinline__ int64_t seq_offset(int b, int64_t stride_b, int row0, int64_t stride_s) {
  if constexpr (VARLEN) return static_cast<int64_t>(row0) * stride_s;
  return b * stride_b;
}

// The options of one (sequence, query head) block: the ALiBi slope (0: off), the Philox key and offset, and
// the packed rows of the sequence's query 0 and key 0 (dense: b Sq and b Sk).
struct BwdOpts {
  float slope;
  uint32_t seed_lo, seed_hi, offset, ig0, jg0;
};

__device__ __forceinline__ BwdOpts bwd_opts(const BwdParams& p, uint32_t ig0, uint32_t jg0) {
  BwdOpts o{0.f, 0u, 0u, 0u, ig0, jg0};
  if (p.seed != nullptr) {
    const uint64_t s = static_cast<uint64_t>(p.seed[0]);
    o.seed_lo = static_cast<uint32_t>(s);
    o.seed_hi = static_cast<uint32_t>(s >> 32);
    o.offset = static_cast<uint32_t>(static_cast<uint64_t>(p.seed[1]));
  }
  return o;
}

__device__ __forceinline__ float alibi_slope(const BwdParams& p, int b, int h) {
  return p.alibi != nullptr ? p.alibi[b * p.alibi_sb + h] : 0.f;
}

// The log2-domain score of raw product s = q.k under the options, rel = (j - i) - (Sk - Sq):
// (c tanh(scale s / c) - slope |rel|) log2 e; dcap = 1 - tanh^2, the softcap's factor on dS (1 without).
__device__ __forceinline__ float option_score(const BwdParams& p, float s, int rel, float slope, float& dcap) {
  float t = s * p.scale;
  dcap = 1.f;
  if (p.softcap > 0.f) {
    const float th = tanhf(t / p.softcap);
    t = p.softcap * th;
    dcap = 1.f - th * th;
  }
  return (t - slope * fabsf(static_cast<float>(rel))) * kLog2e;
}

// Whether dropout keeps entry (packed query row ig, packed key row jg, query head h): word jg & 3 of
// Philox4x32-10(counter (jg >> 2, ig, h, offset), key (seed_lo, seed_hi)) >= threshold.
__device__ __forceinline__ bool dropout_keep_one(const BwdOpts& o, uint32_t ig, uint32_t jg, uint32_t h, uint32_t threshold) {
  uint32_t w[4] = {jg >> 2, ig, h, o.offset};
  philox4x32(w, o.seed_lo, o.seed_hi);
  const uint32_t sel = jg & 3;
  return (sel == 0 ? w[0] : sel == 1 ? w[1] : sel == 2 ? w[2] : w[3]) >= threshold;
}

// Block index (b * H + h) * blocks + i on grid x.
struct BwdBlock {
  int b, h, i;
};

__host__ __device__ __forceinline__ BwdBlock bwd_block(int index, int H, int blocks) {
  const int bh = index / blocks;
  return {bh / H, bh % H, index - bh * blocks};
}

// Rows [row0, row0 + ROWS) of a (S, D) matrix (S >= 1) into shared memory (row stride LD) by
// cp.async; rows at or beyond S are zero-filled. Thread t moves 16-byte chunk t % (D / 8) of rows
// t / (D / 8) + k * (128 / (D / 8)).
template <typename T, int D, int ROWS, int LD>
__device__ __forceinline__ void cp_async_tile(T* dst, const T* src, int64_t stride, int row0, int S) {
  constexpr int kChunks = D / 8;
  constexpr int kStep = kBwdThreads / kChunks;
  static_assert(ROWS % kStep == 0, "cp_async_tile: whole passes of the block");
  const int r = static_cast<int>(threadIdx.x) / kChunks;
  const int col = (static_cast<int>(threadIdx.x) % kChunks) * 8;
  const T* from = src + static_cast<int64_t>(row0 + r) * stride + col;
  const int64_t step = kStep * stride;
  const int left = S - row0 - r;
  T* to = dst + r * LD + col;
#pragma unroll
  for (int k = 0; k < ROWS / kStep; ++k) {
    const bool ok = k * kStep < left;
    cp_async_16(to + k * kStep * LD, ok ? from + k * step : src, ok ? 16 : 0);
  }
}

// N floats (N % 4 == 0, 16-byte aligned on both sides) by cp.async.
template <int N>
__device__ __forceinline__ void cp_async_floats(float* dst, const float* src) {
  static_assert(N / 4 <= kBwdThreads, "cp_async_floats: one pass of the block");
  if (threadIdx.x < N / 4) cp_async_16(dst + 4 * threadIdx.x, src + 4 * threadIdx.x);
}

// The A fragments of rows [16w, 16w + 16) of a (16 * 4, D) shared tile (row stride LD), one per k16
// chunk of the head dim.
template <int D, int LD, typename T>
__device__ __forceinline__ void load_a_frags(uint32_t (&f)[D / 16][4], const T* tile, int warp, int lane) {
  const T* row = tile + (warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8;
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) ldmatrix<4, false>(f[kc], row + kc * 16);
}

// acc (16 x 8) += A (16 x D, fragments f) * B where B(d, n) = tile[n][d] for rows n of tile
// (row stride LD) starting at `rows`: the B fragments of a row-major (n, d) tile, by ldmatrix.
template <typename T, int D, int LD>
__device__ __forceinline__ void mma_rows(float (&acc)[4], const uint32_t (&f)[D / 16][4], const T* rows, int lane) {
  const T* p = rows + (lane & 7) * LD + (lane >> 3) * 8;
#pragma unroll
  for (int kc = 0; kc < D / 16; kc += 2) {
    uint32_t r[4];
    ldmatrix<4, false>(r, p + kc * 16);
    mma_m16n8k16<T>(acc, f[kc], r[0], r[1]);
    mma_m16n8k16<T>(acc, f[kc + 1], r[2], r[3]);
  }
}

// acc (16 x D) += A (16 x 16, fragment a) * tile[k0..k0+16)[0..D) (a row-major (k, d) tile, row
// stride LD), B fragments by ldmatrix.trans.
template <typename T, int D, int LD>
__device__ __forceinline__ void mma_trans(float (&acc)[D / 8][4], const uint32_t (&a)[4], const T* tile, int k0, int lane) {
  const T* p = tile + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8;
#pragma unroll
  for (int t = 0; t < D / 8; t += 2) {
    uint32_t r[4];
    ldmatrix<4, true>(r, p + t * 8);
    mma_m16n8k16<T>(acc[t], a, r[0], r[1]);
    mma_m16n8k16<T>(acc[t + 1], a, r[2], r[3]);
  }
}

// The A fragment of k16 chunk kk from accumulators of n8 tiles 2 kk and 2 kk + 1 (the C layout
// of two adjacent n8 tiles is the A layout of one k16 chunk).
template <typename T, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&s)[NT][4], int kk) {
  a[0] = pack_float<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack_float<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack_float<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack_float<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// acc_to_a with each element s[j][i] times rp where bit 4 j + i of keep is set, else 0 (dropout).
template <typename T, int NT>
__device__ __forceinline__ void acc_to_a_kept(uint32_t (&a)[4], const float (&s)[NT][4], int kk, uint32_t keep, float rp) {
  auto f = [&](int j, int i) { return (keep >> (4 * j + i)) & 1u ? s[j][i] * rp : 0.f; };
  a[0] = pack_float<T>(f(2 * kk, 0), f(2 * kk, 1));
  a[1] = pack_float<T>(f(2 * kk, 2), f(2 * kk, 3));
  a[2] = pack_float<T>(f(2 * kk + 1, 0), f(2 * kk + 1, 1));
  a[3] = pack_float<T>(f(2 * kk + 1, 2), f(2 * kk + 1, 3));
}

// Rows of 16 x (D / 8) accumulator tiles to global memory: row r0 (d[0], d[1]) and r0 + 8
// (d[2], d[3]) of `base` (row stride `stride`), times `mul`, rows at or beyond S skipped.
template <typename T, int D>
__device__ __forceinline__ void store_acc(T* base, int64_t stride, int r0, int S, const float (&acc)[D / 8][4], float mul,
                                          int c) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + 8 * r;
    if (row >= S) continue;
    T* out = base + static_cast<int64_t>(row) * stride + 2 * c;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      *reinterpret_cast<uint32_t*>(out + t * 8) = pack_float<T>(acc[t][2 * r] * mul, acc[t][2 * r + 1] * mul);
    }
  }
}

// ---- preprocess: delta, lse2 ------------------------------------------------------------------

// VARLEN: the workspace keeps the dense layout (b * Hq + h) * Sq_pad + i over the longest length, so the
// other kernels read it exactly as in the dense case; rows at or beyond a sequence's length are padding.
template <typename T, int D, bool VARLEN>
__global__ void __launch_bounds__(kBwdThreads) attention_bwd_preprocess_kernel(BwdParams p) {
  constexpr int kPerRow = D / 8;                 // threads per row, 8 elements each
  constexpr int kRows = kBwdThreads / kPerRow;   // rows per pass
  const BwdBlock blk = bwd_block(static_cast<int>(blockIdx.x), p.Hq, p.blocks);
  const auto seq = bwd_seq<VARLEN>(p, blk.b);
  const T* O = static_cast<const T*>(p.o) + seq_offset<VARLEN>(blk.b, p.so[0], seq.q0(), p.so[2]) + blk.h * p.so[1];
  const T* dO = static_cast<const T*>(p.dout) + seq_offset<VARLEN>(blk.b, p.sdo[0], seq.q0(), p.sdo[2]) + blk.h * p.sdo[1];
  const float* L = p.lse + blk.b * p.sl[0] + blk.h * p.sl[1] + seq.q0();
  const int64_t ws = static_cast<int64_t>(blk.b * p.Hq + blk.h) * p.Sq_pad;
  const int sub = threadIdx.x % kPerRow;
  for (int i = blk.i * kPadRows + threadIdx.x / kPerRow; i < (blk.i + 1) * kPadRows; i += kRows) {
    float acc = 0.f;
    if (i < seq.Sq()) {
      float o[8], d[8];
      load_float<T, 8>(O + static_cast<int64_t>(i) * p.so[2] + sub * 8, o);
      load_float<T, 8>(dO + static_cast<int64_t>(i) * p.sdo[2] + sub * 8, d);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc += o[j] * d[j];
    }
#pragma unroll
    for (int off = kPerRow / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (sub == 0) {
      float delta = 0.f;
      float lse2 = INFINITY;
      if (i < seq.Sq()) {
        delta = p.dlse ? acc - p.dlse[blk.b * p.sdl[0] + blk.h * p.sdl[1] + seq.q0() + i] : acc;
        const float l = L[i];
        lse2 = l == kNegInf ? INFINITY : l * kLog2e;
      }
      p.delta[ws + i] = delta;
      p.lse2[ws + i] = lse2;
    }
  }
}

// ---- dK, dV -----------------------------------------------------------------------------------

// Shared memory: K (KSMEM only), then two Q and two dO tiles (where V, and K unless KSMEM, stage
// first), in T elements; two lse2 and two delta tiles of BQ floats follow.
template <int D, int BQ, bool KSMEM>
__host__ __device__ constexpr size_t dkdv_smem_elems() {
  return static_cast<size_t>((KSMEM ? kKeyBlock : 0) + max_of(4 * BQ, (KSMEM ? 1 : 2) * kKeyBlock)) * (D + 8);
}

// BQ query rows per step. KSMEM: K's A fragments are read from shared memory at every step instead
// of being held in registers (at D = 128, K, V, dK and dV fragments alone would take 192).
// VARLEN: packed sequences (BwdParams); OPTIONS: softcap, ALiBi and dropout, each behind a runtime test.
template <typename T, int D, int BQ, bool KSMEM, bool VARLEN, bool OPTIONS>
__global__ void __launch_bounds__(kBwdThreads, 1) attention_bwd_dkdv_kernel(BwdParams p) {
  constexpr int LD = D + 8;   // padded row stride: ldmatrix rows 16 bytes apart modulo 128, no conflicts
  constexpr int KC = D / 16;  // k16 chunks of the head dim
  constexpr int DT = D / 8;   // n8 tiles of the head dim
  constexpr int NT = BQ / 8;  // n8 tiles of a query block
  FASTLM_DYN_SMEM(smem);
  T* Ks = reinterpret_cast<T*>(smem);                 // [kKeyBlock][LD] (KSMEM)
  T* Qs = Ks + (KSMEM ? kKeyBlock * LD : 0);          // [2][BQ][LD]
  T* dOs = Qs + 2 * BQ * LD;                          // [2][BQ][LD]
  float* L2s = reinterpret_cast<float*>(Ks + dkdv_smem_elems<D, BQ, KSMEM>());  // [2][BQ]
  float* Dls = L2s + 2 * BQ;                                              // [2][BQ]

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;
  const int c = lane & 3;
  const BwdBlock blk = bwd_block(static_cast<int>(blockIdx.x), p.Hkv, p.blocks);
  const int b = blk.b;
  const int hk = blk.h;
  const int n0 = blk.i * kKeyBlock;
  const auto seq = bwd_seq<VARLEN>(p, b);
  if constexpr (VARLEN) {
    if (n0 >= seq.Sk()) return;  // past this sequence's keys
  }

  const T* K = static_cast<const T*>(p.k) + seq_offset<VARLEN>(b, p.sk[0], seq.k0(), p.sk[2]) + hk * p.sk[1];
  const T* V = static_cast<const T*>(p.v) + seq_offset<VARLEN>(b, p.sv[0], seq.k0(), p.sv[2]) + hk * p.sv[1];
  T* Vstage = KSMEM ? Qs : Qs + kKeyBlock * LD;
  cp_async_tile<T, D, kKeyBlock, LD>(KSMEM ? Ks : Qs, K, p.sk[2], n0, seq.Sk());
  cp_async_tile<T, D, kKeyBlock, LD>(Vstage, V, p.sv[2], n0, seq.Sk());
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t kf[KSMEM ? 1 : KC][4], vf[KC][4];
  if constexpr (!KSMEM) load_a_frags<D, LD>(kf, Qs, warp, lane);
  load_a_frags<D, LD>(vf, Vstage, warp, lane);
  __syncthreads();

  // queries that see a key of [n0, n_last]: i in [n0 - hi, n_last - lo]
  const int n_last = min_of(n0 + kKeyBlock, seq.Sk()) - 1;
  const int i_lo = static_cast<int>(max_of<int64_t>(0, static_cast<int64_t>(n0) - seq.hi()));
  const int i_hi = static_cast<int>(min_of<int64_t>(seq.Sq() - 1, static_cast<int64_t>(n_last) - seq.lo()));
  const int m_begin = (i_lo / BQ) * BQ;
  const int nmb = i_hi >= i_lo ? ceil_div(i_hi + 1 - m_begin, BQ) : 0;
  const int total = p.group * nmb;

  auto load_step = [&](int it, int buf) {
    const int gi = it / nmb;
    const int m0 = m_begin + (it - gi * nmb) * BQ;
    const int h = hk * p.group + gi;
    const int q0 = reread_row0<VARLEN>(p.cu_q, b, seq.q0());
    const T* Q = static_cast<const T*>(p.q) + seq_offset<VARLEN>(b, p.sq[0], q0, p.sq[2]) + h * p.sq[1];
    const T* dO = static_cast<const T*>(p.dout) + seq_offset<VARLEN>(b, p.sdo[0], q0, p.sdo[2]) + h * p.sdo[1];
    cp_async_tile<T, D, BQ, LD>(Qs + buf * BQ * LD, Q, p.sq[2], m0, reread_len<VARLEN>(p.cu_q, b, q0, p.Sq, seq.Sq()));
    cp_async_tile<T, D, BQ, LD>(dOs + buf * BQ * LD, dO, p.sdo[2], m0, reread_len<VARLEN>(p.cu_q, b, q0, p.Sq, seq.Sq()));
    const int64_t ws = static_cast<int64_t>(b * p.Hq + h) * p.Sq_pad + m0;
    cp_async_floats<BQ>(L2s + buf * BQ, p.lse2 + ws);
    cp_async_floats<BQ>(Dls + buf * BQ, p.delta + ws);
  };

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) dk[t][i] = dv[t][i] = 0.f;
  }
  const int key0 = n0 + warp * 16 + g;  // this lane's keys: key0 and key0 + 8
  const bool key_ok[2] = {key0 < seq.Sk(), key0 + 8 < seq.Sk()};
  const bool key_edge = n0 + kKeyBlock > seq.Sk();  // VARLEN: the block runs past the last key (held, not Sk)
  const unsigned span = static_cast<unsigned>(seq.hi() - seq.lo());  // visible iff (j - i) - lo in [0, span]
  BwdOpts opts{};
  if constexpr (OPTIONS) {
    opts = bwd_opts(p, VARLEN ? static_cast<uint32_t>(seq.q0()) : static_cast<uint32_t>(b) * static_cast<uint32_t>(p.Sq),
                    VARLEN ? static_cast<uint32_t>(seq.k0()) : static_cast<uint32_t>(b) * static_cast<uint32_t>(p.Sk));
  }
  if (total > 0) load_step(0, 0);
  cp_async_commit();
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    if (it + 1 < total) load_step(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* qs = Qs + buf * BQ * LD;
    const T* dos = dOs + buf * BQ * LD;
    const float* l2 = L2s + buf * BQ;
    const float* dl = Dls + buf * BQ;
    const int gi = it / nmb;
    const int m0 = m_begin + (it - gi * nmb) * BQ;
    const bool need_mask = (VARLEN ? key_edge : n0 + kKeyBlock > p.Sk) || n0 - (m0 + BQ - 1) < seq.lo() ||
                           n0 + kKeyBlock - 1 - m0 > seq.hi();

    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    if constexpr (KSMEM) {
      const T* krow = Ks + (warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8;
      const T* qrow = qs + ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        uint32_t a[4];
        ldmatrix<4, false>(a, krow + kc * 16);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
          uint32_t r[4];
          ldmatrix<4, false>(r, qrow + j * 8 * LD + kc * 16);
          mma_m16n8k16<T>(s[j], a, r[0], r[1]);
          mma_m16n8k16<T>(s[j + 1], a, r[2], r[3]);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < NT; ++j) mma_rows<T, D, LD>(s[j], kf, qs + j * 8 * LD, lane);
    }
    // OPTIONS: dcap the softcap's factor on dS, keep bit 4 j + i the dropout mask of s[j][i]
    float dcap[OPTIONS ? NT : 1][4];
    uint32_t keep = ~0u;
    auto probs = [&](auto masked) {
      const unsigned base = static_cast<unsigned>(key0 - m0 - 2 * c - seq.lo());  // (j - i) - lo of element 0
      [[maybe_unused]] float slope = 0.f;
      [[maybe_unused]] int rel0 = 0;  // (j - i) - (Sk - Sq) of element 0
      if constexpr (OPTIONS) {
        slope = alibi_slope(p, b, hk * p.group + gi);
        rel0 = key0 - m0 - 2 * c - (seq.Sk() - seq.Sq());
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const float2 l = *reinterpret_cast<const float2*>(l2 + j * 8 + 2 * c);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float pv;
          if constexpr (OPTIONS) {
            const int rel = rel0 + 8 * (i >> 1) - (i & 1) - 8 * j;
            pv = exp2f(option_score(p, s[j][i], rel, slope, dcap[j][i]) - ((i & 1) ? l.y : l.x));
          } else {
            pv = exp2f(s[j][i] * p.scale_log2 - ((i & 1) ? l.y : l.x));
          }
          if constexpr (decltype(masked)::value) {
            if (!key_ok[i >> 1] || base + static_cast<unsigned>(8 * (i >> 1) - (i & 1) - 8 * j) > span) pv = 0.f;
          }
          s[j][i] = pv;
        }
      }
    };
    if (need_mask) {
      probs(std::true_type{});
    } else {
      probs(std::false_type{});
    }
    if constexpr (OPTIONS) {
      if (p.seed != nullptr) {
        const uint32_t h = static_cast<uint32_t>(hk * p.group + gi);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint32_t ig = opts.ig0 + static_cast<uint32_t>(m0 + 8 * j + 2 * c + (i & 1));
            const uint32_t jg = opts.jg0 + static_cast<uint32_t>(key0 + 8 * (i >> 1));
            if (!dropout_keep_one(opts, ig, jg, h, p.threshold)) keep &= ~(1u << (4 * j + i));
          }
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t a[4];
      if constexpr (OPTIONS) {
        acc_to_a_kept<T, NT>(a, s, kk, keep, p.rp);
      } else {
        acc_to_a<T, NT>(a, s, kk);
      }
      mma_trans<T, D, LD>(dv, a, dos, kk * 16, lane);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float dp[4] = {0.f, 0.f, 0.f, 0.f};
      mma_rows<T, D, LD>(dp, vf, dos + j * 8 * LD, lane);
      const float2 d = *reinterpret_cast<const float2*>(dl + j * 8 + 2 * c);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (OPTIONS) {
          const float dpk = (keep >> (4 * j + i)) & 1u ? dp[i] * p.rp : 0.f;
          s[j][i] *= (dpk - ((i & 1) ? d.y : d.x)) * dcap[j][i];
        } else {
          s[j][i] *= dp[i] - ((i & 1) ? d.y : d.x);
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      uint32_t a[4];
      acc_to_a<T, NT>(a, s, kk);
      mma_trans<T, D, LD>(dk, a, qs, kk * 16, lane);
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
  cp_async_wait<0>();

  const int k0 = reread_row0<VARLEN>(p.cu_k, b, seq.k0());
  store_acc<T, D>(static_cast<T*>(p.dk) + seq_offset<VARLEN>(b, p.sdk[0], k0, p.sdk[2]) + hk * p.sdk[1], p.sdk[2], key0,
                  reread_len<VARLEN>(p.cu_k, b, k0, p.Sk, seq.Sk()), dk, p.scale, c);
  store_acc<T, D>(static_cast<T*>(p.dv) + seq_offset<VARLEN>(b, p.sdv[0], k0, p.sdv[2]) + hk * p.sdv[1], p.sdv[2], key0,
                  reread_len<VARLEN>(p.cu_k, b, k0, p.Sk, seq.Sk()), dv, 1.f, c);
}

// ---- dQ ---------------------------------------------------------------------------------------

template <int D, int BN>
__host__ __device__ constexpr size_t dq_smem_elems() {
  return static_cast<size_t>(max_of(4 * BN, 2 * kQueryBlock)) * (D + 8);
}

template <typename T, int D, int BN, bool VARLEN, bool OPTIONS>
__global__ void __launch_bounds__(kBwdThreads, 1) attention_bwd_dq_kernel(BwdParams p) {
  constexpr int LD = D + 8;
  constexpr int KC = D / 16;
  constexpr int DT = D / 8;
  constexpr int NT = BN / 8;
  FASTLM_DYN_SMEM(smem);
  T* Ks = reinterpret_cast<T*>(smem);  // [2][BN][LD]; before the loop Q and dO stage here
  T* Vs = Ks + 2 * BN * LD;            // [2][BN][LD]

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;
  const int c = lane & 3;
  const BwdBlock blk = bwd_block(static_cast<int>(blockIdx.x), p.Hq, p.blocks);
  const int b = blk.b;
  const int h = blk.h;
  const int hk = h / p.group;
  const auto seq = bwd_seq<VARLEN>(p, b);
  int mb = p.reverse ? p.blocks - 1 - blk.i : blk.i;
  if constexpr (VARLEN) {
    const int blocks = ceil_div(seq.Sq(), kQueryBlock);  // this sequence's query blocks
    if (blk.i >= blocks) return;
    mb = p.reverse ? blocks - 1 - blk.i : blk.i;
  }
  const int m0 = mb * kQueryBlock;

  const T* Q = static_cast<const T*>(p.q) + seq_offset<VARLEN>(b, p.sq[0], seq.q0(), p.sq[2]) + h * p.sq[1];
  const T* dO = static_cast<const T*>(p.dout) + seq_offset<VARLEN>(b, p.sdo[0], seq.q0(), p.sdo[2]) + h * p.sdo[1];
  cp_async_tile<T, D, kQueryBlock, LD>(Ks, Q, p.sq[2], m0, seq.Sq());
  cp_async_tile<T, D, kQueryBlock, LD>(Ks + kQueryBlock * LD, dO, p.sdo[2], m0, seq.Sq());
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[KC][4], df[KC][4];
  load_a_frags<D, LD>(qf, Ks, warp, lane);
  load_a_frags<D, LD>(df, Ks + kQueryBlock * LD, warp, lane);
  __syncthreads();

  const int row0 = m0 + warp * 16 + g;  // this lane's rows: row0 and row0 + 8
  const int64_t ws = static_cast<int64_t>(b * p.Hq + h) * p.Sq_pad;
  const float l2[2] = {p.lse2[ws + row0], p.lse2[ws + row0 + 8]};
  const float dl[2] = {p.delta[ws + row0], p.delta[ws + row0 + 8]};
  const unsigned span = static_cast<unsigned>(seq.hi() - seq.lo());  // visible iff (j - i) - lo in [0, span]

  // keys seen by a query of [m0, m_last]: j in [m0 + lo, m_last + hi]
  const int m_last = min_of(m0 + kQueryBlock, seq.Sq()) - 1;
  const int j_lo = static_cast<int>(max_of<int64_t>(0, static_cast<int64_t>(m0) + seq.lo()));
  const int j_hi = static_cast<int>(min_of<int64_t>(seq.Sk() - 1, static_cast<int64_t>(m_last) + seq.hi()));
  const int n_begin = (j_lo / BN) * BN;
  const int total = j_hi >= j_lo ? ceil_div(j_hi + 1 - n_begin, BN) : 0;

  const T* K = static_cast<const T*>(p.k) + seq_offset<VARLEN>(b, p.sk[0], seq.k0(), p.sk[2]) + hk * p.sk[1];
  const T* V = static_cast<const T*>(p.v) + seq_offset<VARLEN>(b, p.sv[0], seq.k0(), p.sv[2]) + hk * p.sv[1];
  auto load_step = [&](int it, int buf) {
    cp_async_tile<T, D, BN, LD>(Ks + buf * BN * LD, K, p.sk[2], n_begin + it * BN, seq.Sk());
    cp_async_tile<T, D, BN, LD>(Vs + buf * BN * LD, V, p.sv[2], n_begin + it * BN, seq.Sk());
  };
  BwdOpts opts{};
  if constexpr (OPTIONS) {
    opts = bwd_opts(p, VARLEN ? static_cast<uint32_t>(seq.q0()) : static_cast<uint32_t>(b) * static_cast<uint32_t>(p.Sq),
                    VARLEN ? static_cast<uint32_t>(seq.k0()) : static_cast<uint32_t>(b) * static_cast<uint32_t>(p.Sk));
    opts.slope = alibi_slope(p, b, h);
  }

  float dq[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t) dq[t][0] = dq[t][1] = dq[t][2] = dq[t][3] = 0.f;
  if (total > 0) load_step(0, 0);
  cp_async_commit();
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    if (it + 1 < total) load_step(it + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* ks = Ks + buf * BN * LD;
    const T* vs = Vs + buf * BN * LD;
    const int n0 = n_begin + it * BN;
    const bool need_mask = n0 + BN > seq.Sk() || n0 - (m0 + kQueryBlock - 1) < seq.lo() || n0 + BN - 1 - m0 > seq.hi();

    float s[NT][4];
    auto grads = [&](auto masked) {
      const int key_c = n0 + 2 * c;
      const unsigned base = static_cast<unsigned>(key_c - row0 - seq.lo());  // (j - i) - lo of element 0
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        mma_rows<T, D, LD>(s[j], qf, ks + j * 8 * LD, lane);
        float dp[4] = {0.f, 0.f, 0.f, 0.f};
        mma_rows<T, D, LD>(dp, df, vs + j * 8 * LD, lane);
        [[maybe_unused]] bool keep[4] = {true, true, true, true};
        if constexpr (OPTIONS) {
          if (p.seed != nullptr) {
            const uint32_t jg = opts.jg0 + static_cast<uint32_t>(key_c + 8 * j);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const uint32_t ig = opts.ig0 + static_cast<uint32_t>(row0 + 8 * r);
              keep[2 * r] = dropout_keep_pair(ig, jg, static_cast<uint32_t>(h), opts.offset, opts.seed_lo, opts.seed_hi,
                                              p.threshold, &keep[2 * r + 1]);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float pv;
          [[maybe_unused]] float dcap = 1.f;
          if constexpr (OPTIONS) {
            const int rel = key_c + 8 * j + (i & 1) - row0 - 8 * (i >> 1) - (seq.Sk() - seq.Sq());
            pv = exp2f(option_score(p, s[j][i], rel, opts.slope, dcap) - l2[i >> 1]);
          } else {
            pv = exp2f(s[j][i] * p.scale_log2 - l2[i >> 1]);
          }
          if constexpr (decltype(masked)::value) {
            if (key_c + j * 8 + (i & 1) >= seq.Sk() || base + static_cast<unsigned>(8 * j + (i & 1) - 8 * (i >> 1)) > span) {
              pv = 0.f;
            }
          }
          if constexpr (OPTIONS) {
            s[j][i] = pv * ((keep[i] ? dp[i] * p.rp : 0.f) - dl[i >> 1]) * dcap;
          } else {
            s[j][i] = pv * (dp[i] - dl[i >> 1]);
          }
        }
      }
    };
    if (need_mask) {
      grads(std::true_type{});
    } else {
      grads(std::false_type{});
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      acc_to_a<T, NT>(a, s, kk);
      mma_trans<T, D, LD>(dq, a, ks, kk * 16, lane);
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  T* dQ = static_cast<T*>(p.dq) + seq_offset<VARLEN>(b, p.sdq[0], seq.q0(), p.sdq[2]) + h * p.sdq[1];
  store_acc<T, D>(dQ, p.sdq[2], row0, seq.Sq(), dq, p.scale, c);
}

// Tiles per head dim, chosen for 0 spills on sm_80 and sm_90a: dK/dV query rows per step and
// whether K stays in shared memory, dQ keys per step.
template <int D, bool OPTIONS>
constexpr int kDkdvBQ = 32;
template <int D>
constexpr bool kDkdvKSmem = D == 128;
template <int D, bool OPTIONS>
constexpr int kDqBN = D == 64 ? 64 : 32;

// (j - i) - lo is formed in 32-bit unsigned arithmetic: exact while Sq + Sk + 64 < 2^31.
constexpr int64_t kMaxSeq = int64_t{1} << 30;

int64_t padded_rows(int64_t Sq) { return ceil_div<int64_t>(Sq, kPadRows) * kPadRows; }

}  // namespace

bool attention_bwd_supported(int64_t D, int dtype) { return (D == 64 || D == 128) && (dtype == kFloat16 || dtype == kBFloat16); }

int64_t attention_bwd_workspace_size(int64_t B, int64_t Hq, int64_t Sq) {
  if (B < 0 || Hq < 0 || Sq < 0 || Sq > kMaxSeq) return -1;
  return mul_within(mul_within(mul_within(B, Hq, INT64_MAX), padded_rows(Sq), INT64_MAX), 2, INT64_MAX);
}

std::vector<std::array<int64_t, 3>> attention_bwd_grids(int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk) {
  if (B < 1 || Hq < 1 || Hkv < 1 || Sq < 1 || Sk < 0 || Sq > kMaxSeq || Sk > kMaxSeq) return {};
  const int64_t pre = mul_within(mul_within(B, Hq, kMaxGridX), padded_rows(Sq) / kPadRows, kMaxGridX);
  const int64_t dkdv = mul_within(mul_within(B, Hkv, kMaxGridX), ceil_div<int64_t>(Sk, kKeyBlock), kMaxGridX);
  const int64_t dq = mul_within(mul_within(B, Hq, kMaxGridX), ceil_div<int64_t>(Sq, kQueryBlock), kMaxGridX);
  if (pre < 0 || dkdv < 0 || dq < 0) return {};
  std::vector<std::array<int64_t, 3>> grids{{pre, 1, 1}};
  if (dkdv > 0) grids.push_back({dkdv, 1, 1});
  grids.push_back({dq, 1, 1});
  return grids;
}

namespace {

// The checks and launches shared by attention_bwd and attention_varlen_bwd: p holds the pointers, the
// strides and the window sides; Sq, Sk are the (longest) lengths. Returns a cudaError_t code.
int bwd_launch(BwdParams p, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, const std::vector<int64_t>& strides,
               double scale, bool causal, int64_t window_left, int64_t window_right, double softcap, uintptr_t alibi,
               int64_t alibi_stride_b, double dropout_p, uintptr_t seed, int dtype, uintptr_t stream, bool varlen, bool aligned) {
  if (strides.size() != 28 || B < 0 || Hq < 0 || Hkv < 0 || Sq < 0 || Sk < 0 || !attention_bwd_supported(D, dtype)) {
    return cudaErrorInvalidValue;
  }
  if (!(softcap >= 0.0) || !std::isfinite(softcap) || !(dropout_p >= 0.0 && dropout_p < 1.0) || (dropout_p > 0.0 && seed == 0) ||
      alibi_stride_b < 0) {
    return cudaErrorInvalidValue;
  }
  if (B == 0 || Hq == 0 || Hkv == 0 || Sq == 0) return cudaSuccess;
  if (Hq % Hkv != 0) return cudaErrorInvalidValue;
  const auto grids = attention_bwd_grids(B, Hq, Hkv, Sq, Sk);
  if (grids.empty() || !aligned || p.delta == nullptr || p.lse == nullptr) return cudaErrorInvalidValue;
  for (int i = 0; i < 24; ++i) {
    if (strides[i] % 8 != 0) return cudaErrorInvalidValue;  // 16-byte rows for cp.async and the vector loads
  }
  int64_t* dst[8] = {p.sq, p.sk, p.sv, p.so, p.sdo, p.sdq, p.sdk, p.sdv};
  for (int t = 0; t < 8; ++t) {
    for (int i = 0; i < 3; ++i) dst[t][i] = varlen && i == 0 ? 0 : strides[3 * t + i];
  }
  p.sl[0] = varlen ? 0 : strides[24];
  p.sl[1] = strides[25];
  p.sdl[0] = varlen ? 0 : strides[26];
  p.sdl[1] = strides[27];
  const int64_t Sq_pad = padded_rows(Sq);
  p.lse2 = p.delta + B * Hq * Sq_pad;
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.group = static_cast<int>(Hq / Hkv);
  p.Sq = static_cast<int>(Sq);
  p.Sk = static_cast<int>(Sk);
  p.Sq_pad = static_cast<int>(Sq_pad);
  // the window as fastlm.triton.attention.resolve_window: causal caps the right side at the diagonal
  p.has_left = window_left >= 0;
  p.left = static_cast<int>(min_of<int64_t>(max_of<int64_t>(window_left, 0), kMaxSeq));
  p.has_right = causal || window_right >= 0;
  const int64_t right = causal ? (window_right < 0 ? 0 : min_of<int64_t>(window_right, 0)) : max_of<int64_t>(window_right, 0);
  p.right = static_cast<int>(min_of<int64_t>(right, kMaxSeq));
  visible_band(p, Sq, Sk, p.lo, p.hi);
  p.reverse = p.has_right;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.softcap = static_cast<float>(softcap);
  p.alibi = reinterpret_cast<const float*>(alibi);
  p.alibi_sb = alibi_stride_b;
  p.seed = dropout_p > 0.0 ? reinterpret_cast<const int64_t*>(seed) : nullptr;
  p.threshold = static_cast<uint32_t>(min_of<double>(std::floor(dropout_p * 4294967296.0), 4294967295.0));
  p.rp = static_cast<float>(1.0 / (1.0 - dropout_p));
  const bool options = softcap > 0.0 || alibi != 0 || dropout_p > 0.0;
  const dim3 block(kBwdThreads);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_half(dtype, [&](auto tt) -> int {
    using T = typename decltype(tt)::type;
    return dispatch_dim<64, 128>(D, [&](auto dd) -> int {
      constexpr int kD = decltype(dd)::value;
      return dispatch_bool(varlen, [&](auto vv) -> int {
        constexpr bool VL = decltype(vv)::value;
        BwdParams pp = p;
        pp.blocks = static_cast<int>(Sq_pad / kPadRows);
        cudaError_t err = launch(attention_bwd_preprocess_kernel<T, kD, VL>, to_dim3(grids[0]), block, st, pp);
        if (err != cudaSuccess) return err;
        return dispatch_bool(options, [&](auto oo) -> int {
          constexpr bool OP = decltype(oo)::value;
          constexpr int BQ = kDkdvBQ<kD, OP>;
          constexpr int BN = kDqBN<kD, OP>;
          if (Sk > 0) {
            pp.blocks = static_cast<int>(ceil_div<int64_t>(Sk, kKeyBlock));
            constexpr bool KS = kDkdvKSmem<kD>;
            const size_t smem = dkdv_smem_elems<kD, BQ, KS>() * sizeof(T) + 4 * BQ * sizeof(float);
            const cudaError_t e =
                launch_smem(attention_bwd_dkdv_kernel<T, kD, BQ, KS, VL, OP>, to_dim3(grids[1]), block, smem, st, pp);
            if (e != cudaSuccess) return e;
          }
          pp.blocks = static_cast<int>(ceil_div<int64_t>(Sq, kQueryBlock));
          const size_t smem = dq_smem_elems<kD, BN>() * sizeof(T);
          return static_cast<int>(
              launch_smem(attention_bwd_dq_kernel<T, kD, BN, VL, OP>, to_dim3(grids.back()), block, smem, st, pp));
        });
      });
    });
  });
}

BwdParams bwd_pointers(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                       uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t workspace) {
  BwdParams p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.o = reinterpret_cast<const void*>(out);
  p.dout = reinterpret_cast<const void*>(dout);
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  p.lse = reinterpret_cast<const float*>(lse);
  p.dlse = reinterpret_cast<const float*>(dlse);
  p.delta = reinterpret_cast<float*>(workspace);
  return p;
}

bool bwd_aligned(std::initializer_list<uintptr_t> ptrs) {
  for (uintptr_t ptr_v : ptrs) {
    if (!aligned_to(ptr_v, 16)) return false;
  }
  return true;
}

}  // namespace

int attention_bwd(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                  uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t workspace, int64_t B, int64_t Hq, int64_t Hkv,
                  int64_t Sq, int64_t Sk, int64_t D, const std::vector<int64_t>& strides, double scale, bool causal,
                  int64_t window_left, int64_t window_right, int dtype, uintptr_t stream, double softcap, uintptr_t alibi_slopes,
                  int64_t alibi_stride_b, double dropout_p, uintptr_t seed) {
  const bool aligned = bwd_aligned({dout, q, k, v, out, dq, dk, dv, workspace});
  const BwdParams p = bwd_pointers(dout, dlse, q, k, v, out, lse, dq, dk, dv, workspace);
  return bwd_launch(p, B, Hq, Hkv, Sq, Sk, D, strides, scale, causal, window_left, window_right, softcap, alibi_slopes,
                    alibi_stride_b, dropout_p, seed, dtype, stream, false, aligned);
}

int attention_varlen_bwd(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                         uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t workspace, uintptr_t cu_seqlens_q,
                         uintptr_t cu_seqlens_k, int64_t B, int64_t Hq, int64_t Hkv, int64_t max_seqlen_q, int64_t max_seqlen_k,
                         int64_t D, const std::vector<int64_t>& strides, double scale, bool causal, int64_t window_left,
                         int64_t window_right, int dtype, uintptr_t stream, double softcap, uintptr_t alibi_slopes,
                         int64_t alibi_stride_b, double dropout_p, uintptr_t seed) {
  if (cu_seqlens_q == 0 || cu_seqlens_k == 0) return cudaErrorInvalidValue;
  const bool aligned = bwd_aligned({dout, q, k, v, out, dq, dk, dv, workspace});
  BwdParams p = bwd_pointers(dout, dlse, q, k, v, out, lse, dq, dk, dv, workspace);
  p.cu_q = reinterpret_cast<const int*>(cu_seqlens_q);
  p.cu_k = reinterpret_cast<const int*>(cu_seqlens_k);
  return bwd_launch(p, B, Hq, Hkv, max_seqlen_q, max_seqlen_k, D, strides, scale, causal, window_left, window_right, softcap,
                    alibi_slopes, alibi_stride_b, dropout_p, seed, dtype, stream, true, aligned);
}

}  // namespace fastlm
