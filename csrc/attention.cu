// Fused attention forward (FlashAttention-2 class, tensor-core mma.sync) in fp16/bf16 at head dim
// 64, 96 and 128: causal (bottom-right aligned) or not, sliding windows, GQA/MQA, writing O and the
// log-sum-exp; split-KV with a combine kernel when the (batch, head, query block) tiles alone would
// leave SMs idle. fp32, other head dims and scale <= 0 are routed to Triton by
// fastlm/cuda/attention.py; the launcher returns cudaErrorInvalidValue for them. The KV-cache
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
  int64_t rows;      // B * Hq * Sq: the partials' row count
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

// The key tiles [lo, hi) that query rows [m0, m0 + kBM) ∩ [0, Sq) can see, and the share of split s.
struct TileRange {
  int lo, hi;
};

__host__ __device__ __forceinline__ TileRange fwd_tiles(const FwdParams& p, int m0, int split) {
  const int diag = p.Sk - p.Sq;
  const int last = min_of(m0 + kBM, p.Sq) - 1;
  const int64_t klo = p.left >= 0 ? max_of<int64_t>(0, int64_t{m0} + diag - p.left) : 0;
  const int64_t khi = p.right >= 0 ? min_of<int64_t>(p.Sk, int64_t{last} + diag + p.right + 1) : p.Sk;
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
// 128 registers, two blocks per SM, D = 64 and 96 spilled).
template <typename T, int D>
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
  const TileRange tiles = fwd_tiles(p, m0, blk.split);

  const T* Q = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* K = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
  const T* V = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];

  load_tile_async<T, D, kBM, LD>(Qs, Q, p.sq[2], m0, p.Sq);
  cp_async_commit();
  if (tiles.lo < tiles.hi) {
    load_tile_async<T, D, kBN, LD>(Ks, K, p.sk[2], tiles.lo * kBN, p.Sk);
    load_tile_async<T, D, kBN, LD>(Vs, V, p.sv[2], tiles.lo * kBN, p.Sk);
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
  const int diag = p.Sk - p.Sq;
  const int qi0 = m0 + warp * 16 + g;  // this lane's query rows: qi0 and qi0 + 8
  const int last = min_of(m0 + kBM, p.Sq) - 1;

  auto step = [&](int t, auto masked) {
    const int stage = (t - tiles.lo) & 1;
    cp_async_wait<0>();
    __syncthreads();  // tile t is visible to every warp, and every warp is done with tile t - 1
    if (t + 1 < tiles.hi) {
      load_tile_async<T, D, kBN, LD>(Ks + (stage ^ 1) * kBN * LD, K, p.sk[2], (t + 1) * kBN, p.Sk);
      load_tile_async<T, D, kBN, LD>(Vs + (stage ^ 1) * kBN * LD, V, p.sv[2], (t + 1) * kBN, p.Sk);
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

    if constexpr (decltype(masked)::value) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = n0 + j * 8 + 2 * c + (i & 1);
          const int row = qi0 + 8 * (i >> 1) + diag;
          const bool seen = key < p.Sk && (p.right < 0 || key <= row + p.right) && (p.left < 0 || key >= row - p.left);
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
      const float m_new = fmaxf(m_row[r], quad_max(mx[r]) * p.scale_log2);
      m_use[r] = m_new == kNegInf ? 0.f : m_new;
      alpha[r] = exp2_ftz(m_row[r] - m_use[r]);
      m_row[r] = m_new;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[j][i] = exp2_ftz(fmaf(s[j][i], p.scale_log2, -m_use[i >> 1]));
        rsum[i >> 1] += s[j][i];
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
  const int64_t right_end = p.right >= 0 ? min_of<int64_t>(p.Sk, int64_t{m0} + diag + p.right + 1) : p.Sk;
  const int full_hi = max_of(full_lo, static_cast<int>(max_of<int64_t>(right_end, 0) / kBN));
  int t = tiles.lo;
  for (; t < min_of(full_lo, tiles.hi); ++t) step(t, std::true_type{});
  for (; t < min_of(full_hi, tiles.hi); ++t) step(t, std::false_type{});
  for (; t < tiles.hi; ++t) step(t, std::true_type{});

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_row[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse2 = l > 0.f ? m_row[r] + log2f(l) : kNegInf;
    const int qi = qi0 + 8 * r;
    if (qi >= p.Sq) continue;
    if (p.splits == 1) {
      T* orow = static_cast<T*>(p.o) + b * p.so[0] + h * p.so[1] + static_cast<int64_t>(qi) * p.so[2] + 2 * c;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        *reinterpret_cast<uint32_t*>(orow + d * 8) = pack_float<T>(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
      }
      if (c == 0) p.lse[b * p.sl[0] + h * p.sl[1] + qi] = lse2 * kLn2;
    } else {
      const int64_t prow = blk.split * p.rows + (static_cast<int64_t>(b) * p.Hq + h) * p.Sq + qi;
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
                  int64_t window_right, int64_t num_splits, int dtype, uintptr_t stream) {
  if (strides.size() != 14 || Hkv <= 0 || Hq % Hkv != 0 || !attention_fwd_supported(D, dtype) || !(scale > 0.0) ||
      !std::isfinite(scale) || Sk < 0)
    return cudaErrorInvalidValue;
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
  FwdParams p{};
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
  p.splits = static_cast<int>(num_splits);
  int64_t right = window_right < 0 ? -1 : window_right;
  if (causal) right = right < 0 ? 0 : min_of<int64_t>(right, 0);
  const int64_t cap = Sq + Sk;  // a wider window is the same as an unbounded one
  p.left = window_left < 0 ? -1 : static_cast<int>(min_of(window_left, cap));
  p.right = right < 0 ? -1 : static_cast<int>(min_of(right, cap));
  p.reverse = p.right >= 0 && p.left < 0;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.rows = B * Hq * Sq;
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_half(dtype, [&](auto tt) -> int {
    using T = typename decltype(tt)::type;
    return dispatch_dim<64, 96, 128>(D, [&](auto dd) -> int {
      constexpr int kD = decltype(dd)::value;
      const size_t smem = static_cast<size_t>(kBM + 4 * kBN) * (kD + 8) * sizeof(T);
      const int code = launch_smem(attention_fwd_kernel<T, kD>, to_dim3(grids[0]), dim3(kFwdThreads), smem, st, p);
      if (code != cudaSuccess || num_splits == 1) return code;
      return launch(attention_fwd_combine_kernel<T, kD>, to_dim3(grids[1]), dim3(32 * kCombineWarps), st,
                    combine_params(p, p.rows));
    });
  });
}

}  // namespace fastlm
