// Fused attention forward (FlashAttention-2 class, tensor-core mma.sync) in fp16/bf16 at head dim
// 64, 96 and 128: causal (bottom-right aligned) or not, sliding windows, GQA/MQA, writing O and the
// log-sum-exp; split-KV with a combine kernel when the (batch, head, query block) tiles alone would
// leave SMs idle; packed variable-length batches (VARLEN) and softcap / ALiBi / dropout (OPTIONS).
// fp32, other head dims and scale <= 0 are routed to Triton by fastlm/cuda/attention.py; the
// launchers return cudaErrorInvalidValue for them. The KV-cache
// decode is csrc/decode_attention.cu, the backward csrc/attention_bwd.cu.
//
// One block (8 warps) owns kBM = 128 query rows of one (batch, query head) and one split of their
// visible key tiles; warp w owns rows 16w..16w+15 and keeps Q in mma A fragments (ldmatrix). Key
// tiles of kBN = 64 rows of K and V stream through a two-stage cp.async ring in shared memory: the
// copy of tile t+1 is in flight while tile t is multiplied, one barrier per tile. Per tile a warp
// computes S = Q K^T (K B-fragments by ldmatrix), masks the boundary tiles, and updates the online
// softmax in log2 units with the scale folded into one FFMA per element (c = scale log2 e):
//     m' = max(m, c rowmax S),  P = 2^(c S - m'),  l' = l 2^(m - m') + rowsum P,  O' = O 2^(m - m') + P V
// The S accumulators are reused as the A operand of P V (the C layout of two adjacent n8 tiles is
// the A layout of one k16 chunk), so P never leaves registers; V's B fragments come from
// ldmatrix.trans. A row's 4 quad lanes combine maxima and sums with two xor shuffles. At the end
// O /= l and LSE = (m + log2 l) ln 2; a row that saw no key gets O = 0, LSE = -inf. With splits,
// each block writes its normalised fp32 partial and log2 LSE, and the combine kernel merges a row's
// splits: O = sum_s 2^(L_s - M) O_s / sum_s 2^(L_s - M), LSE = (M + log2 sum_s 2^(L_s - M)) ln 2.
// Trade-off: 128 rows and two stages keep one block per SM at D = 128 (about 104 KiB of shared
// memory) so the key tile is shared by 8 warps; O is stored from registers (4-byte stores per lane,
// 16 contiguous bytes per quad) rather than restaged for 16-byte stores.
//
// VARLEN (attention_varlen_fwd): packed rows (total, heads, D); block b of the batch axis is sequence
// b, which reads its first rows and lengths from cu_seqlens (int32 prefix sums) and is then the
// attention of that sequence alone (its own bottom-right diagonal, windows, GQA). The grid covers
// ceil(max_seqlen_q / kBM) query blocks of every sequence, and a block past its sequence's end
// exits before its first barrier: no host sync, a launch shape of host ints alone (CUDA graphs).
// The partials' rows are h * total_q + packed row, so the same combine kernel merges the splits.
// OPTIONS: the per-tile scores become x = c tanh(scale s / c) - slope |i + diag - j| (each term behind
// a runtime test) in log2 units before the mask; dropout zeroes P entries after the row sums (the
// LSE is that of the undropped scores) by a Philox4x32-10 word per (query row, 4 keys, head)
// (dropout_keep_pair in csrc/common.h), and 1 / (1 - p) joins the final 1 / l.
//
// The mma.m16n8k16 and ldmatrix fragment layouts are in csrc/common.h.

#include <array>
#include <cmath>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr int kBM = 128;  // query rows per block (16 per warp)
constexpr int kBN = 64;   // keys per tile
constexpr int kFwdWarps = kBM / 16;
constexpr int kFwdThreads = 32 * kFwdWarps;
constexpr int kCombineWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  float* o_part;  // (splits, B * Hq * Sq, D) fp32, splits > 1 only
  float* l_part;  // (splits, B * Hq * Sq) fp32, log2 domain
  int64_t sq[3], sk[3], sv[3], so[3];  // (b, h, s) element strides; d is unit-stride
  int64_t sl[2];                       // lse (b, h); s is unit-stride
  int Hq, group, Sq, Sk;
  int mblocks;       // query blocks per (batch, head): ceil(Sq / kBM)
  int splits;        // key-tile splits per query block
  int left, right;   // window: key j visible to query i iff i + diag - left <= j <= i + diag + right (-1: unbounded)
  bool reverse;      // causal-like (a right bound, no left): later query blocks see more keys
  float scale_log2;  // scale * log2(e), > 0
  int64_t rows;      // B * Hq * Sq (VARLEN: Hq * total_q): the partials' row count
  // VARLEN: q, k, v, o packed (rows, heads, D) with b-strides 0; sequence b owns query rows
  // [cu_q[b], cu_q[b + 1]) and key rows [cu_k[b], cu_k[b + 1]); Sq and Sk above are the longest
  // lengths (the grid's query blocks); lse (Hq, total_q) and the partials' rows h * total_q + row.
  const int* cu_q;
  const int* cu_k;
  int64_t total_q;
  // OPTIONS (fastlm/reference/attention.py, "Options"): softcap c > 0 (0: off), ALiBi slopes
  // alibi[b * alibi_sb + h] (null: off), dropout (seed = [seed, offset] int64 on the device, null:
  // off) keeping an entry iff its Philox word >= drop_threshold, kept entries scaled by drop_scale.
  float softcap;
  float scale;
  const float* alibi;
  int64_t alibi_sb;
  const int64_t* seed;
  uint32_t drop_threshold;
  float drop_scale;
};

// The forward's blocks lie on grid x (2^31 - 1 blocks; y and z stop at 65535): block index
// ((b * Hq + h) * mblocks + i) * splits + s owns split s of query block i of (b, h), or of
// mblocks - 1 - i when `reverse` (the longest key ranges start first).
struct FwdBlock {
  int b, h, mblk, split;
};

__host__ __device__ __forceinline__ FwdBlock fwd_block(int index, int Hq, int mblocks, int splits, bool reverse) {
  const int tile = index / splits;
  const int bh = tile / mblocks;
  const int i = tile - bh * mblocks;
  return {bh / Hq, bh % Hq, reverse ? mblocks - 1 - i : i, index - tile * splits};
}

// The key tiles [lo, hi) that query rows [m0, m0 + kBM) ∩ [0, Sq) of a sequence of Sq queries and
// Sk keys can see, and the share of split s.
struct TileRange {
  int lo, hi;
};

__host__ __device__ __forceinline__ TileRange fwd_tiles(const FwdParams& p, int Sq, int Sk, int m0, int split) {
  const int diag = Sk - Sq;
  const int last = min_of(m0 + kBM, Sq) - 1;
  const int64_t klo = p.left >= 0 ? max_of<int64_t>(0, int64_t{m0} + diag - p.left) : 0;
  const int64_t khi = p.right >= 0 ? min_of<int64_t>(Sk, int64_t{last} + diag + p.right + 1) : Sk;
  if (khi <= klo) return {0, 0};
  const int t_lo = static_cast<int>(klo / kBN);
  const int t_hi = static_cast<int>(ceil_div<int64_t>(khi, kBN));
  const int per = ceil_div(t_hi - t_lo, p.splits);
  const int lo = min_of(t_hi, t_lo + split * per);
  return {lo, min_of(t_hi, lo + per)};
}

// Rows [row0, row0 + ROWS) of a (S, D) matrix with row stride `stride` into shared memory with row
// stride LD by 16-byte cp.async; rows at or beyond S are zero-filled (nothing is read for them).
template <typename T, int D, int ROWS, int LD>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, int64_t stride, int row0, int S) {
  constexpr int kChunks = D / 8;
  static_assert(ROWS * kChunks % kFwdThreads == 0, "whole 16-byte chunks per thread");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / kFwdThreads; ++it) {
    const int i = it * kFwdThreads + static_cast<int>(threadIdx.x);
    const int r = i / kChunks;
    const int c = (i % kChunks) * 8;
    const bool in = row0 + r < S;
    cp_async_16(dst + r * LD + c, src + (in ? static_cast<int64_t>(row0 + r) * stride + c : 0), in ? 16 : 0);
  }
}

// One block per SM: registers up to 255 (Q, O and S fragments alone are 32 + 64 + 32 at D = 128; at
// 128 registers, two blocks per SM, D = 64 and 96 spilled). VARLEN: packed sequences (the block of a
// query block past its sequence's end exits at once); OPTIONS: the path with softcap, ALiBi and
// dropout, each behind a runtime test (the launcher takes it only when one is set).
template <typename T, int D, bool VARLEN, bool OPTIONS>
__global__ void __launch_bounds__(kFwdThreads, 1) attention_fwd_kernel(FwdParams p) {
  constexpr int LD = D + 8;    // padded row stride: 8 rows' 16-byte segments hit distinct banks
  constexpr int KC = D / 16;   // k16 chunks of the head dim
  constexpr int NT = kBN / 8;  // n8 tiles of S
  constexpr int DT = D / 8;    // n8 tiles of O
  static_assert(KC % 2 == 0 && DT % 2 == 0, "ldmatrix.x4 covers two chunks");
  FASTLM_DYN_SMEM(smem);
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + kBM * LD;       // [2][kBN][LD]
  T* Vs = Ks + 2 * kBN * LD;   // [2][kBN][LD]

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;
  const int c = lane & 3;
  const FwdBlock blk = fwd_block(static_cast<int>(blockIdx.x), p.Hq, p.mblocks, p.splits, p.reverse);
  const int b = blk.b;
  const int h = blk.h;
  const int hk = h / p.group;
  const int m0 = blk.mblk * kBM;
  int Sq = p.Sq;
  int Sk = p.Sk;
  int q_row0 = 0;  // VARLEN: the sequence's first packed query and key rows
  int k_row0 = 0;
  if constexpr (VARLEN) {
    q_row0 = p.cu_q[b];
    k_row0 = p.cu_k[b];
    Sq = p.cu_q[b + 1] - q_row0;
    Sk = p.cu_k[b + 1] - k_row0;
    if (m0 >= Sq) return;
  }
  const TileRange tiles = fwd_tiles(p, Sq, Sk, m0, blk.split);

  const T* Q = static_cast<const T*>(p.q) + (VARLEN ? q_row0 * p.sq[2] : b * p.sq[0]) + h * p.sq[1];
  const T* K = static_cast<const T*>(p.k) + (VARLEN ? k_row0 * p.sk[2] : b * p.sk[0]) + hk * p.sk[1];
  const T* V = static_cast<const T*>(p.v) + (VARLEN ? k_row0 * p.sv[2] : b * p.sv[0]) + hk * p.sv[1];

  load_tile_async<T, D, kBM, LD>(Qs, Q, p.sq[2], m0, Sq);
  cp_async_commit();
  if (tiles.lo < tiles.hi) {
    load_tile_async<T, D, kBN, LD>(Ks, K, p.sk[2], tiles.lo * kBN, Sk);
    load_tile_async<T, D, kBN, LD>(Vs, V, p.sv[2], tiles.lo * kBN, Sk);
  }
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) ldmatrix<4, false>(qf[kc], Qs + (warp * 16 + (lane & 15)) * LD + kc * 16 + (lane >> 4) * 8);

  float o[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float m_row[2] = {kNegInf, kNegInf};  // running maxima, log2 units (scaled)
  float l_row[2] = {0.f, 0.f};
  const int diag = Sk - Sq;
  const int qi0 = m0 + warp * 16 + g;  // this lane's query rows: qi0 and qi0 + 8
  const int last = min_of(m0 + kBM, Sq) - 1;
  // OPTIONS: x = scale q.k, x <- c tanh(x / c), x <- x - slope |i + diag - j|, kept in log2 units
  // (the online softmax below then multiplies by 1 rather than scale log2 e).
  const float mul = OPTIONS ? 1.f : p.scale_log2;
  const bool softcap = OPTIONS && p.softcap > 0.f;
  const float inv_softcap = softcap ? 1.f / p.softcap : 0.f;
  const float slope = OPTIONS && p.alibi != nullptr ? p.alibi[b * p.alibi_sb + h] : 0.f;
  const bool dropout = OPTIONS && p.seed != nullptr;
  uint32_t seed_lo = 0, seed_hi = 0, offset = 0;
  if (dropout) {
    seed_lo = static_cast<uint32_t>(p.seed[0] & 0xffffffff);
    seed_hi = static_cast<uint32_t>((p.seed[0] >> 32) & 0xffffffff);
    offset = static_cast<uint32_t>(p.seed[1] & 0xffffffff);
  }
  // packed rows (mod 2^32) of query qi0 and of key 0
  const uint32_t ig0 = static_cast<uint32_t>(VARLEN ? q_row0 : static_cast<uint32_t>(b) * static_cast<uint32_t>(Sq)) + qi0;
  const uint32_t jg0 = static_cast<uint32_t>(VARLEN ? k_row0 : static_cast<uint32_t>(b) * static_cast<uint32_t>(Sk));

  auto step = [&](int t, auto masked) {
    const int stage = (t - tiles.lo) & 1;
    cp_async_wait<0>();
    __syncthreads();  // tile t is visible to every warp, and every warp is done with tile t - 1
    if (t + 1 < tiles.hi) {
      load_tile_async<T, D, kBN, LD>(Ks + (stage ^ 1) * kBN * LD, K, p.sk[2], (t + 1) * kBN, Sk);
      load_tile_async<T, D, kBN, LD>(Vs + (stage ^ 1) * kBN * LD, V, p.sv[2], (t + 1) * kBN, Sk);
    }
    cp_async_commit();
    const T* Kt = Ks + stage * kBN * LD;
    const T* Vt = Vs + stage * kBN * LD;
    const int n0 = t * kBN;

    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < KC; kc += 2) {
        uint32_t kb[4];
        ldmatrix<4, false>(kb, Kt + (j * 8 + (lane & 7)) * LD + kc * 16 + (lane >> 3) * 8);
        mma_m16n8k16<T>(s[j], qf[kc], kb[0], kb[1]);
        mma_m16n8k16<T>(s[j], qf[kc + 1], kb[2], kb[3]);
      }
    }

    if constexpr (OPTIONS) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float x = s[j][i] * p.scale;
          if (softcap) x = p.softcap * tanhf(x * inv_softcap);
          const int key = n0 + j * 8 + 2 * c + (i & 1);
          const int row = qi0 + 8 * (i >> 1) + diag;
          x = fmaf(-slope, fabsf(static_cast<float>(row - key)), x);
          s[j][i] = x * kLog2e;
        }
      }
    }

    if constexpr (decltype(masked)::value) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = n0 + j * 8 + 2 * c + (i & 1);
          const int row = qi0 + 8 * (i >> 1) + diag;
          const bool seen = key < Sk && (p.right < 0 || key <= row + p.right) && (p.left < 0 || key >= row - p.left);
          if (!seen) s[j][i] = kNegInf;
        }
      }
    }

    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
    }
    float m_use[2], alpha[2], rsum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_row[r], quad_max(mx[r]) * mul);
      m_use[r] = m_new == kNegInf ? 0.f : m_new;
      alpha[r] = exp2_ftz(m_row[r] - m_use[r]);
      m_row[r] = m_new;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[j][i] = exp2_ftz(fmaf(s[j][i], mul, -m_use[i >> 1]));
        rsum[i >> 1] += s[j][i];
      }
    }
    if (dropout) {  // after the row sums: the LSE is that of S before dropout
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          bool keep_next;
          const bool keep = dropout_keep_pair(ig0 + 8 * r, jg0 + n0 + j * 8 + 2 * c, h, offset, seed_lo, seed_hi,
                                              p.drop_threshold, &keep_next);
          if (!keep) s[j][2 * r] = 0.f;
          if (!keep_next) s[j][2 * r + 1] = 0.f;
        }
      }
    }
    l_row[0] = l_row[0] * alpha[0] + rsum[0];
    l_row[1] = l_row[1] * alpha[1] + rsum[1];
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[d][0] *= alpha[0];
      o[d][1] *= alpha[0];
      o[d][2] *= alpha[1];
      o[d][3] *= alpha[1];
    }

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pack_float<T>(s[2 * kk][0], s[2 * kk][1]), pack_float<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack_float<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_float<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int d = 0; d < DT; d += 2) {
        uint32_t vb[4];
        ldmatrix<4, true>(vb, Vt + (kk * 16 + (lane & 15)) * LD + d * 8 + (lane >> 4) * 8);
        mma_m16n8k16<T>(o[d], a, vb[0], vb[1]);
        mma_m16n8k16<T>(o[d + 1], a, vb[2], vb[3]);
      }
    }
  };
  // Tiles [full_lo, full_hi) need no mask: every key in them is visible to every row of the block.
  const int full_lo = p.left >= 0 ? max_of(tiles.lo, ceil_div(max_of(last + diag - p.left, 0), kBN)) : tiles.lo;
  const int64_t right_end = p.right >= 0 ? min_of<int64_t>(Sk, int64_t{m0} + diag + p.right + 1) : Sk;
  const int full_hi = max_of(full_lo, static_cast<int>(max_of<int64_t>(right_end, 0) / kBN));
  int t = tiles.lo;
  for (; t < min_of(full_lo, tiles.hi); ++t) step(t, std::true_type{});
  for (; t < min_of(full_hi, tiles.hi); ++t) step(t, std::false_type{});
  for (; t < tiles.hi; ++t) step(t, std::true_type{});

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_row[r]);
    const float inv = l > 0.f ? (dropout ? p.drop_scale : 1.f) / l : 0.f;
    const float lse2 = l > 0.f ? m_row[r] + log2f(l) : kNegInf;
    const int qi = qi0 + 8 * r;
    if (qi >= Sq) continue;
    if (p.splits == 1) {
      T* orow = static_cast<T*>(p.o) + (VARLEN ? 0 : b * p.so[0]) + h * p.so[1] +
                static_cast<int64_t>(VARLEN ? q_row0 + qi : qi) * p.so[2] + 2 * c;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        *reinterpret_cast<uint32_t*>(orow + d * 8) = pack_float<T>(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
      }
      if (c == 0) p.lse[(VARLEN ? q_row0 : b * p.sl[0]) + h * p.sl[1] + qi] = lse2 * kLn2;
    } else {
      const int64_t prow = blk.split * p.rows + (VARLEN ? h * p.total_q + q_row0 : (static_cast<int64_t>(b) * p.Hq + h) * p.Sq) + qi;
      float* orow = p.o_part + prow * D + 2 * c;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        *reinterpret_cast<float2*>(orow + d * 8) = make_float2(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
      }
      if (c == 0) p.l_part[prow] = lse2;
    }
  }
}

// One warp per row (b, h, i), grid-stride over the rows: merges the row's splits in split order.
template <typename T, int D>
__global__ void __launch_bounds__(32 * kCombineWarps) attention_fwd_combine_kernel(CombineParams p) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kCombineWarps) {
    combine_row<T, D>(p, row, lane);
  }
}

bool fwd_sizes_ok(int64_t B, int64_t Hq, int64_t Sq, int64_t splits) {
  return B >= 1 && Hq >= 1 && Sq >= 1 && Sq <= INT32_MAX - 2 * kBM && splits >= 1 && splits <= 1024;
}

// The options into p (OPTIONS path); false for bad values. Returns in *any whether one is set.
bool set_options(FwdParams& p, double scale, double softcap, uintptr_t alibi_slopes, int64_t alibi_stride_b,
                 double dropout_p, uintptr_t seed, bool* any) {
  if (!(softcap >= 0.0) || !std::isfinite(softcap) || !(dropout_p >= 0.0) || !(dropout_p < 1.0) ||
      (dropout_p > 0.0 && seed == 0) || alibi_stride_b < 0)
    return false;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.alibi = reinterpret_cast<const float*>(alibi_slopes);
  p.alibi_sb = alibi_stride_b;
  p.seed = dropout_p > 0.0 ? reinterpret_cast<const int64_t*>(seed) : nullptr;
  p.drop_threshold = static_cast<uint32_t>(min_of(std::floor(dropout_p * 4294967296.0), 4294967295.0));
  p.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  *any = softcap > 0.0 || alibi_slopes != 0 || dropout_p > 0.0;
  return true;
}

// The shape-independent part of both launchers: scale, window, splits, and the launch itself.
int run_fwd(FwdParams& p, int64_t Sq, int64_t Sk, double scale, bool causal, int64_t window_left, int64_t window_right,
            int64_t num_splits, bool varlen, bool options, int64_t D, int dtype, const std::array<int64_t, 3>& grid,
            const CombineParams& cp, uintptr_t stream) {
  p.splits = static_cast<int>(num_splits);
  int64_t right = window_right < 0 ? -1 : window_right;
  if (causal) right = right < 0 ? 0 : min_of<int64_t>(right, 0);
  const int64_t cap = Sq + Sk;  // a wider window is the same as an unbounded one
  p.left = window_left < 0 ? -1 : static_cast<int>(min_of(window_left, cap));
  p.right = right < 0 ? -1 : static_cast<int>(min_of(right, cap));
  p.reverse = p.right >= 0 && p.left < 0;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const std::array<int64_t, 3> cgrid = {min_of(ceil_div<int64_t>(cp.rows, kCombineWarps), kMaxGridX), 1, 1};
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_half(dtype, [&](auto tt) -> int {
    using T = typename decltype(tt)::type;
    return dispatch_dim<64, 96, 128>(D, [&](auto dd) -> int {
      constexpr int kD = decltype(dd)::value;
      const size_t smem = static_cast<size_t>(kBM + 4 * kBN) * (kD + 8) * sizeof(T);
      const int code = dispatch_bool(varlen, [&](auto vl) -> int {
        return dispatch_bool(options, [&](auto op) -> int {
          return launch_smem(attention_fwd_kernel<T, kD, decltype(vl)::value, decltype(op)::value>, to_dim3(grid),
                             dim3(kFwdThreads), smem, st, p);
        });
      });
      if (code != cudaSuccess || num_splits == 1) return code;
      return launch(attention_fwd_combine_kernel<T, kD>, to_dim3(cgrid), dim3(32 * kCombineWarps), st, cp);
    });
  });
}

}  // namespace

bool attention_fwd_supported(int64_t D, int dtype) {
  return (D == 64 || D == 96 || D == 128) && (dtype == kFloat16 || dtype == kBFloat16);
}

int64_t attention_fwd_block_rows() { return kBM; }

std::vector<std::array<int64_t, 3>> attention_fwd_grids(int64_t B, int64_t Hq, int64_t Sq, int64_t num_splits) {
  if (!fwd_sizes_ok(B, Hq, Sq, num_splits)) return {};
  const int64_t blocks =
      mul_within(mul_within(mul_within(B, Hq, kMaxGridX), ceil_div<int64_t>(Sq, kBM), kMaxGridX), num_splits, kMaxGridX);
  if (blocks < 0) return {};
  if (num_splits == 1) return {{blocks, 1, 1}};
  const int64_t rows = B * Hq * Sq;
  return {{blocks, 1, 1}, {min_of(ceil_div<int64_t>(rows, kCombineWarps), kMaxGridX), 1, 1}};
}

std::array<int64_t, 4> attention_fwd_block(int64_t index, int64_t Hq, int64_t Sq, bool reverse, int64_t num_splits) {
  if (index < 0 || index > kMaxGridX || Hq < 1 || Hq > kMaxGridX || !fwd_sizes_ok(1, 1, Sq, num_splits)) {
    return {-1, -1, -1, -1};
  }
  const FwdBlock blk = fwd_block(static_cast<int>(index), static_cast<int>(Hq), static_cast<int>(ceil_div<int64_t>(Sq, kBM)),
                                 static_cast<int>(num_splits), reverse);
  return {blk.b, blk.h, blk.mblk, blk.split};
}

int attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t o_part,
                  uintptr_t lse_part, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D,
                  const std::vector<int64_t>& strides, double scale, bool causal, int64_t window_left,
                  int64_t window_right, int64_t num_splits, int dtype, uintptr_t stream, double softcap,
                  uintptr_t alibi_slopes, int64_t alibi_stride_b, double dropout_p, uintptr_t seed) {
  if (strides.size() != 14 || Hkv <= 0 || Hq % Hkv != 0 || !attention_fwd_supported(D, dtype) || !(scale > 0.0) ||
      !std::isfinite(scale) || Sk < 0)
    return cudaErrorInvalidValue;
  FwdParams p{};
  bool options = false;
  if (!set_options(p, scale, softcap, alibi_slopes, alibi_stride_b, dropout_p, seed, &options)) return cudaErrorInvalidValue;
  if (B == 0 || Hq == 0 || Sq == 0) return cudaSuccess;
  const auto grids = attention_fwd_grids(B, Hq, Sq, num_splits);
  if (grids.empty() || Sq + Sk > INT32_MAX / 2) return cudaErrorInvalidValue;  // index sums stay in int
  if (num_splits > 1 && (o_part == 0 || lse_part == 0)) return cudaErrorInvalidValue;
  for (int i = 0; i < 12; ++i) {
    if (strides[i] % 8 != 0) return cudaErrorInvalidValue;  // 16-byte rows for cp.async and ldmatrix
  }
  for (uintptr_t ptr_v : {q, k, v, out}) {
    if (!aligned_to(ptr_v, 16)) return cudaErrorInvalidValue;
  }
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.o = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.o_part = reinterpret_cast<float*>(o_part);
  p.l_part = reinterpret_cast<float*>(lse_part);
  set_attention_strides(p, strides);
  p.Hq = static_cast<int>(Hq);
  p.group = static_cast<int>(Hq / Hkv);
  p.Sq = static_cast<int>(Sq);
  p.Sk = static_cast<int>(Sk);
  p.mblocks = static_cast<int>(ceil_div<int64_t>(Sq, kBM));
  p.rows = B * Hq * Sq;
  p.splits = static_cast<int>(num_splits);
  return run_fwd(p, Sq, Sk, scale, causal, window_left, window_right, num_splits, false, options, D, dtype, grids[0],
                 combine_params(p, p.rows), stream);
}

int attention_varlen_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k,
                         uintptr_t out, uintptr_t lse, uintptr_t o_part, uintptr_t lse_part, int64_t B, int64_t Hq,
                         int64_t Hkv, int64_t total_q, int64_t total_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                         int64_t D, const std::vector<int64_t>& strides, double scale, bool causal, int64_t window_left,
                         int64_t window_right, int64_t num_splits, int dtype, uintptr_t stream, double softcap,
                         uintptr_t alibi_slopes, int64_t alibi_stride_b, double dropout_p, uintptr_t seed) {
  if (strides.size() != 9 || Hkv <= 0 || Hq % Hkv != 0 || !attention_fwd_supported(D, dtype) || !(scale > 0.0) ||
      !std::isfinite(scale) || B < 0 || total_q < 0 || total_k < 0 || max_seqlen_q < 0 || max_seqlen_k < 0 ||
      max_seqlen_q + max_seqlen_k > INT32_MAX / 2)
    return cudaErrorInvalidValue;
  FwdParams p{};
  bool options = false;
  if (!set_options(p, scale, softcap, alibi_slopes, alibi_stride_b, dropout_p, seed, &options)) return cudaErrorInvalidValue;
  if (B == 0 || Hq == 0 || total_q == 0 || max_seqlen_q == 0) return cudaSuccess;
  const auto grids = attention_fwd_grids(B, Hq, max_seqlen_q, num_splits);
  // packed rows and their sums stay in int; the combine's rows h * total_q + row too
  if (grids.empty() || total_q + total_k > INT32_MAX / 2 || mul_within(Hq, total_q, INT32_MAX) < 0 ||
      cu_seqlens_q == 0 || cu_seqlens_k == 0)
    return cudaErrorInvalidValue;
  if (num_splits > 1 && (o_part == 0 || lse_part == 0)) return cudaErrorInvalidValue;
  for (int i = 0; i < 8; ++i) {
    if (strides[i] % 8 != 0) return cudaErrorInvalidValue;  // 16-byte rows for cp.async and ldmatrix
  }
  for (uintptr_t ptr_v : {q, k, v, out}) {
    if (!aligned_to(ptr_v, 16)) return cudaErrorInvalidValue;
  }
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.o = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  p.o_part = reinterpret_cast<float*>(o_part);
  p.l_part = reinterpret_cast<float*>(lse_part);
  p.sq[0] = p.sk[0] = p.sv[0] = p.so[0] = p.sl[0] = 0;
  p.sq[2] = strides[0], p.sq[1] = strides[1];
  p.sk[2] = strides[2], p.sk[1] = strides[3];
  p.sv[2] = strides[4], p.sv[1] = strides[5];
  p.so[2] = strides[6], p.so[1] = strides[7];
  p.sl[1] = strides[8];
  p.cu_q = reinterpret_cast<const int*>(cu_seqlens_q);
  p.cu_k = reinterpret_cast<const int*>(cu_seqlens_k);
  p.total_q = total_q;
  p.Hq = static_cast<int>(Hq);
  p.group = static_cast<int>(Hq / Hkv);
  p.Sq = static_cast<int>(max_seqlen_q);
  p.Sk = static_cast<int>(max_seqlen_k);
  p.mblocks = static_cast<int>(ceil_div<int64_t>(max_seqlen_q, kBM));
  p.rows = Hq * total_q;
  p.splits = static_cast<int>(num_splits);
  CombineParams cp = combine_params(p, p.rows);  // rows h * total_q + packed row: (b, h, t) = (0, h, row)
  cp.Sq = static_cast<int>(total_q);
  return run_fwd(p, max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, num_splits, true, options, D,
                 dtype, grids[0], cp, stream);
}

}  // namespace fastlm
