// KV-cache decode attention (split-KV + combine) in fp16/bf16 at head dim 64, 128, 256 with
// per-sequence lengths and an optional left window; fp32, other head dims and GQA groups of more
// than 64 rows are routed to Triton by fastlm/cuda/attention.py.
//
// Split kernel. Block (batch b, key/value head hk, split s) of 4 warps covers all G = Hq / Hkv
// query heads and Sq tokens of hk: R = G * Sq rows (row r = query head hk * G + r / Sq, token
// r % Sq), padded to MT m tiles of 16 (R <= 16 MT <= 64), so each K/V row is read once per group.
// The visible keys of sequence b, [lo_b, L_b) (lo_b = L_b - Sq - window_left with a window, else
// 0), are cut into `splits` chunks rounded up to the tile of N keys; block s walks chunk s in tiles
// staged through a ring of STAGES shared-memory slots by 16-byte cp.async (consecutive threads copy
// consecutive 16-byte pieces of a key row; keys past the chunk are zero-filled, never read), so
// STAGES - 1 tiles are in flight while one is used, one barrier per tile. Warp w owns m tile
// w / WN and key slice w % WN (WN = 4 / MT warps share an m tile, N / WN keys each): S = Q K^T
// and O += P V on mma.sync m16n8k16 (ldmatrix for Q and K, ldmatrix .trans for V), P kept in
// registers, the online softmax in fp32 in the log2 domain (x = s * scale * log2 e, p = 2^(x - m)).
// The WN warps of an m tile merge in a fixed order through shared memory:
//   M = max_w m_w, O = sum_w 2^(m_w - M) O_w / sum_w 2^(m_w - M) l_w,
// and the block writes the fp32 partial (normalised O, log2-domain LSE) of its split; with one
// split it writes out and lse directly. The combine kernel merges the splits per row:
//   O = sum_s 2^(lse_s - M) O_s / sum_s 2^(lse_s - M).
//
// Paged caches (paged_decode_split_kernel, the same body with PAGED): caches (num_pages, Hkv,
// page_size, D), key j of sequence b in row j % page_size of page block_table[b, j / page_size];
// each 16-byte cp.async row copy looks up its page id (clamped to [0, num_pages)), nothing else
// changes, so the paged and contiguous kernels give the same bits on the same keys.
// paged_kv_append_kernel writes new rows into their pages (16-byte copies on aligned rows).
//
// Options (decode_split_options_kernel, paged_decode_split_options_kernel: the body with OPTIONS):
// softcap and ALiBi on the scaled score before the mask, x = c tanh(scale s / c) - slope_h |L - Sq + t - j|
// (slope of the row's query head h; each term behind a runtime test), then the same softmax.

#include <array>
#include <cmath>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr int kDecThreads = 128;
constexpr int kDecWarps = kDecThreads / 32;
constexpr int kDecMaxRows = 64;
constexpr float kLog2e = 1.4426950408889634f;

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const int* lens;
  float* o_part;  // (splits, B, Hq, Sq, D) fp32
  float* l_part;  // (splits, B, Hq, Sq) fp32, log2 domain
  void* o;        // written directly when splits == 1
  float* lse;
  int64_t sq[3], sk[3], sv[3], so[3], sl[2];
  int B, Hq, Hkv, group, Sq, S_max, splits, left, right;  // right <= 0 (decode is causal)
  bool has_left, q_vec;                                   // q_vec: q rows 16-byte aligned
  float scale_log2;
  // Paged caches (paged_decode_split_kernel): (num_pages, Hkv, 2^page_shift, D), sk[0] / sv[0] the
  // page strides, S_max = max_pages << page_shift; block_table (B, max_pages) int32, row stride sbt.
  const int* block_table;
  int64_t sbt;
  int page_shift, num_pages;
  // OPTIONS (fastlm/reference/attention.py, "Options"): softcap c > 0 (0: off) and ALiBi slopes
  // alibi[b * alibi_sb + query head] (null: off) on the scaled score (scale: the plain one).
  float softcap, scale;
  const float* alibi;
  int64_t alibi_sb;
};

// Split blocks: grid x = b * Hkv + hk (2^31 - 1 blocks), grid y = the split (at most 65535).
struct DecodeBlock {
  int b, hk;
};

__host__ __device__ __forceinline__ DecodeBlock decode_block(int index, int Hkv) {
  return {index / Hkv, index % Hkv};
}

// Tile shape of the split kernel for head dim D and MT m tiles of 16 rows.
template <int D, int MT>
struct DecodeTile {
  static constexpr int kWarpsN = kDecWarps / MT;                  // warps sharing an m tile
  static constexpr int kKeys = D == 256 && MT == 4 ? 32 : 64;     // keys per stage (N)
  static constexpr int kSlice = kKeys / kWarpsN;                  // keys per warp per stage
  static constexpr int kStages = D == 64 ? 3 : 2;
  static constexpr int kLd = D + 8;                               // shared row, elements (16-byte multiple)
  static constexpr int kRows = 16 * MT;
  static constexpr int kKV = kKeys * kLd;                         // elements of one K or V slot
  static constexpr int kOutLd = D + 8;                            // fp32 merge row, floats
  static constexpr size_t kSmem = (2 * static_cast<size_t>(kStages) * kKV + kRows * kLd) * 2;
  static_assert(kSlice % 16 == 0, "each warp takes whole 16-key mma steps");
  static_assert(kDecThreads % (D / 8) == 0 && kKeys % (kDecThreads / (D / 8)) == 0, "equal copies per thread");
  static_assert(kDecWarps * 16 * kOutLd * 4 <= 2 * kStages * kKV * 2, "the merge buffer reuses the K/V ring");
};

// Copies key rows [first, first + N) of K and V (row strides sk, sv) into one ring slot: this thread
// the 16 bytes at column tcol of rows tr + i * RS; rows at or past `end` are zero-filled from a valid
// row and never read.
template <typename T, int D, int MT>
__device__ __forceinline__ void decode_load_tile(T* kd, T* vd, const T* K, const T* V, int64_t sk, int64_t sv, int first,
                                                 int end, int tr, int tcol) {
  using Tile = DecodeTile<D, MT>;
  constexpr int RS = kDecThreads / (D / 8);  // rows between one thread's copies
  first += tr;
  const T* kp = K + first * sk + tcol;
  const T* vp = V + first * sv + tcol;
  const int off = tr * Tile::kLd + tcol;
#pragma unroll
  for (int rep = 0; rep < Tile::kKeys / RS; ++rep) {
    const bool in = first + rep * RS < end;
    cp_async_16(kd + off + rep * RS * Tile::kLd, in ? kp : K + tcol, in ? 16 : 0);
    cp_async_16(vd + off + rep * RS * Tile::kLd, in ? vp : V + tcol, in ? 16 : 0);
    kp += RS * sk;
    vp += RS * sv;
  }
}

// The paged form: key j is row j & (2^page_shift - 1) of page table[j >> page_shift] (clamped to
// [0, num_pages)), K and V pointing at page 0 of the block's head; one table entry per copied row,
// the same 16-byte copies otherwise.
template <typename T, int D, int MT>
__device__ __forceinline__ void decode_load_tile_paged(T* kd, T* vd, const T* K, const T* V, const DecodeParams& p,
                                                       const int* table, int first, int end, int tr, int tcol) {
  using Tile = DecodeTile<D, MT>;
  constexpr int RS = kDecThreads / (D / 8);
  const int mask = (1 << p.page_shift) - 1;
  const int off = tr * Tile::kLd + tcol;
#pragma unroll
  for (int rep = 0; rep < Tile::kKeys / RS; ++rep) {
    const int key = first + tr + rep * RS;
    const bool in = key < end;
    const int64_t page = in ? min_of(max_of(table[key >> p.page_shift], 0), p.num_pages - 1) : 0;
    const int64_t slot = key & mask;
    const T* kp = K + page * p.sk[0] + slot * p.sk[2] + tcol;
    const T* vp = V + page * p.sv[0] + slot * p.sv[2] + tcol;
    cp_async_16(kd + off + rep * RS * Tile::kLd, in ? kp : K + tcol, in ? 16 : 0);
    cp_async_16(vd + off + rep * RS * Tile::kLd, in ? vp : V + tcol, in ? 16 : 0);
  }
}

// Resident blocks per SM the split kernel is compiled for (its shared memory allows about as many on
// sm_90a); ptxas then caps the registers at 65536 / (128 n): 170 at D = 64, 255 otherwise.
template <int D>
constexpr int decode_min_blocks() {
  return D == 64 ? 3 : 1;
}

// The split kernel's body; PAGED: paged caches (decode_load_tile_paged), else contiguous ones;
// OPTIONS: the path with softcap and ALiBi (each behind a runtime test; x = scale q.k,
// x <- c tanh(x / c), x <- x - slope |L - Sq + t - j|, then log2 units). wm, wl: the kernel's
// [kDecWarps][16] shared arrays of per-warp row maxima and sums.
template <typename T, int D, int MT, bool PAGED, bool OPTIONS>
__device__ __forceinline__ void decode_split(const DecodeParams& p, float (*wm)[16], float (*wl)[16]) {
  using Tile = DecodeTile<D, MT>;
  constexpr int N = Tile::kKeys;
  constexpr int STAGES = Tile::kStages;
  constexpr int LD = Tile::kLd;
  constexpr int WN = Tile::kWarpsN;
  constexpr int SL = Tile::kSlice;
  constexpr int OLD = Tile::kOutLd;
  constexpr int CH = D / 8;  // 16-byte pieces per row
  FASTLM_DYN_SMEM(smem);
  T* ks = reinterpret_cast<T*>(smem);  // [STAGES][N][LD]
  T* vs = ks + STAGES * Tile::kKV;      // [STAGES][N][LD]
  T* qs = vs + STAGES * Tile::kKV;      // [16 MT][LD]
  float* ob = reinterpret_cast<float*>(smem);  // [4 warps][16][OLD], after the last tile

  const DecodeBlock blk = decode_block(static_cast<int>(blockIdx.x), p.Hkv);
  const int b = blk.b;
  const int hk = blk.hk;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int mw = warp / WN;
  const int kw = warp % WN;
  const int g = lane / 4;
  const int c = lane % 4;
  const int Sq = p.Sq;
  const int rows = p.group * Sq;
  const int L = min_of(max_of(p.lens[b], 0), p.S_max);
  const int hi = L + p.right;
  const int lo_all = p.has_left ? max_of(L - Sq - p.left, 0) : 0;
  const int chunk = ceil_div(ceil_div(max_of(hi - lo_all, 0), p.splits), N) * N;
  const int lo = lo_all + split * chunk;
  const int end = min_of(lo + chunk, hi);
  const int tiles = end > lo ? ceil_div(end - lo, N) : 0;

  const T* K = static_cast<const T*>(p.k) + (PAGED ? 0 : b * p.sk[0]) + hk * p.sk[1];
  const T* V = static_cast<const T*>(p.v) + (PAGED ? 0 : b * p.sv[0]) + hk * p.sv[1];
  const int* table = PAGED ? p.block_table + b * p.sbt : nullptr;
  const int tr = static_cast<int>(threadIdx.x) / CH;
  const int tcol = (static_cast<int>(threadIdx.x) % CH) * 8;
  auto load_tile = [&](int slot, int first) {
    if constexpr (PAGED) {
      decode_load_tile_paged<T, D, MT>(ks + slot * Tile::kKV, vs + slot * Tile::kKV, K, V, p, table, first, end, tr, tcol);
    } else {
      decode_load_tile<T, D, MT>(ks + slot * Tile::kKV, vs + slot * Tile::kKV, K, V, p.sk[2], p.sv[2], first, end, tr, tcol);
    }
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < tiles) load_tile(s, lo + s * N);
    cp_async_commit();
  }

  const T* Q = static_cast<const T*>(p.q) + b * p.sq[0] + static_cast<int64_t>(hk) * p.group * p.sq[1];
  for (int i = threadIdx.x; i < Tile::kRows * CH; i += kDecThreads) {
    const int r = i / CH;
    const int col = (i % CH) * 8;
    Pack<T, 8> pk;
    if (r < rows) {
      const T* src = Q + (r / Sq) * p.sq[1] + (r % Sq) * p.sq[2] + col;
      if (p.q_vec) {
        pk = *reinterpret_cast<const Pack<T, 8>*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) pk.v[e] = src[e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) pk.v[e] = from_float<T>(0.f);
    }
    *reinterpret_cast<Pack<T, 8>*>(qs + r * LD + col) = pk;
  }

  // This lane's rows mw * 16 + g + 8 h (h = 0, 1) see keys [klo[h], khi[h]] of the block's chunk.
  int klo[2], khi[2], diag[2];
  float slope[2] = {0.f, 0.f};
  const bool softcap = OPTIONS && p.softcap > 0.f;
  const float inv_softcap = softcap ? 1.f / p.softcap : 0.f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = mw * 16 + g + 8 * h;
    diag[h] = L - Sq + r % Sq;
    klo[h] = p.has_left ? max_of(lo, diag[h] - p.left) : lo;
    khi[h] = min_of(end - 1, diag[h] + p.right);
    if (OPTIONS && p.alibi != nullptr && r < rows) slope[h] = p.alibi[b * p.alibi_sb + hk * p.group + r / Sq];
  }

  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  }
  float m[2] = {kNegInf, kNegInf};
  float l[2] = {0.f, 0.f};

  const T* qrow = qs + (mw * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8;
  for (int it = 0; it < tiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = it + STAGES - 1;
    if (next < tiles) load_tile(next % STAGES, lo + next * N);
    cp_async_commit();
    const int slot = it % STAGES;
    const T* kt = ks + slot * Tile::kKV + kw * SL * LD;
    const T* vt = vs + slot * Tile::kKV + kw * SL * LD;

    float s[SL / 8][4];
#pragma unroll
    for (int j = 0; j < SL / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    }
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) {
      uint32_t qa[4];
      ldmatrix<4, false>(qa, qrow + kd * 16);
#pragma unroll
      for (int j = 0; j < SL / 16; ++j) {
        uint32_t kb[4];
        ldmatrix<4, false>(kb, kt + (j * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kd * 16 + ((lane >> 3) & 1) * 8);
        mma_m16n8k16<T>(s[2 * j], qa, kb[0], kb[1]);
        mma_m16n8k16<T>(s[2 * j + 1], qa, kb[2], kb[3]);
      }
    }

    const int kbase = lo + it * N + kw * SL + 2 * c;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = kNegInf;
#pragma unroll
      for (int j = 0; j < SL / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = kbase + j * 8 + e;
          float x;
          if constexpr (OPTIONS) {
            float y = s[j][2 * h + e] * p.scale;
            if (softcap) y = p.softcap * tanhf(y * inv_softcap);
            y = fmaf(-slope[h], fabsf(static_cast<float>(diag[h] - key)), y);
            x = key >= klo[h] && key <= khi[h] ? y * kLog2e : kNegInf;
          } else {
            x = key >= klo[h] && key <= khi[h] ? s[j][2 * h + e] * p.scale_log2 : kNegInf;
          }
          s[j][2 * h + e] = x;
          mx = fmaxf(mx, x);
        }
      }
      const float m_new = fmaxf(m[h], quad_max(mx));
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = exp2f(m[h] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < SL / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = exp2f(s[j][2 * h + e] - m_use);
          s[j][2 * h + e] = pr;
          sum += pr;
        }
      }
      l[h] = l[h] * alpha + sum;
      m[h] = m_new;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        acc[n][2 * h] *= alpha;
        acc[n][2 * h + 1] *= alpha;
      }
    }

#pragma unroll
    for (int j = 0; j < SL / 16; ++j) {
      const uint32_t a[4] = {pack_float<T>(s[2 * j][0], s[2 * j][1]), pack_float<T>(s[2 * j][2], s[2 * j][3]),
                             pack_float<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                             pack_float<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t vb[4];
        ldmatrix<4, true>(vb, vt + (j * 16 + (lane & 15)) * LD + n * 8 + (lane >> 4) * 8);
        mma_m16n8k16<T>(acc[n], a, vb[0], vb[1]);
        mma_m16n8k16<T>(acc[n + 1], a, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free: it becomes the merge buffer

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float lsum = quad_sum(l[h]);
    if (c == 0) {
      wm[warp][g + 8 * h] = m[h];
      wl[warp][g + 8 * h] = lsum;
    }
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mm = kNegInf;
#pragma unroll
    for (int w = 0; w < WN; ++w) mm = fmaxf(mm, wm[mw * WN + w][g + 8 * h]);
    const float f = exp2f(m[h] - (mm == kNegInf ? 0.f : mm));
    float* orow = ob + (warp * 16 + g + 8 * h) * OLD + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<float2*>(orow + n * 8) = make_float2(acc[n][2 * h] * f, acc[n][2 * h + 1] * f);
    }
  }
  __syncthreads();

  const int64_t total_rows = static_cast<int64_t>(p.B) * p.Hq * Sq;
  const int64_t row0 = (static_cast<int64_t>(b) * p.Hq + static_cast<int64_t>(hk) * p.group) * Sq;
  for (int i = threadIdx.x; i < rows * (D / 4); i += kDecThreads) {
    const int r = i / (D / 4);
    const int col = (i % (D / 4)) * 4;
    const int rm = r / 16;
    const int rr = r % 16;
    float mm = kNegInf;
#pragma unroll
    for (int w = 0; w < WN; ++w) mm = fmaxf(mm, wm[rm * WN + w][rr]);
    const float m_use = mm == kNegInf ? 0.f : mm;
    float lsum = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < WN; ++w) {
      lsum += wl[rm * WN + w][rr] * exp2f(wm[rm * WN + w][rr] - m_use);
      const float4 part = *reinterpret_cast<const float4*>(ob + ((rm * WN + w) * 16 + rr) * OLD + col);
      o.x += part.x;
      o.y += part.y;
      o.z += part.z;
      o.w += part.w;
    }
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    const float lse2 = lsum > 0.f ? mm + log2f(lsum) : kNegInf;
    if (p.splits == 1) {
      const int qh = hk * p.group + r / Sq;
      const int t = r % Sq;
      T* dst = static_cast<T*>(p.o) + b * p.so[0] + qh * p.so[1] + t * p.so[2] + col;
      dst[0] = from_float<T>(o.x * inv);
      dst[1] = from_float<T>(o.y * inv);
      dst[2] = from_float<T>(o.z * inv);
      dst[3] = from_float<T>(o.w * inv);
      if (col == 0) p.lse[b * p.sl[0] + qh * p.sl[1] + t] = lse2 * kLn2;
    } else {
      const int64_t prow = split * total_rows + row0 + r;
      *reinterpret_cast<float4*>(p.o_part + prow * D + col) = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
      if (col == 0) p.l_part[prow] = lse2;
    }
  }
}

template <typename T, int D, int MT>
__global__ void __launch_bounds__(kDecThreads, decode_min_blocks<D>()) decode_split_kernel(DecodeParams p) {
  __shared__ float wm[kDecWarps][16];
  __shared__ float wl[kDecWarps][16];
  decode_split<T, D, MT, false, false>(p, wm, wl);
}

template <typename T, int D, int MT>
__global__ void __launch_bounds__(kDecThreads, decode_min_blocks<D>()) paged_decode_split_kernel(DecodeParams p) {
  __shared__ float wm[kDecWarps][16];
  __shared__ float wl[kDecWarps][16];
  decode_split<T, D, MT, true, false>(p, wm, wl);
}

// The OPTIONS forms (softcap, ALiBi) of the two split kernels.
template <typename T, int D, int MT>
__global__ void __launch_bounds__(kDecThreads, decode_min_blocks<D>()) decode_split_options_kernel(DecodeParams p) {
  __shared__ float wm[kDecWarps][16];
  __shared__ float wl[kDecWarps][16];
  decode_split<T, D, MT, false, true>(p, wm, wl);
}

template <typename T, int D, int MT>
__global__ void __launch_bounds__(kDecThreads, decode_min_blocks<D>()) paged_decode_split_options_kernel(DecodeParams p) {
  __shared__ float wm[kDecWarps][16];
  __shared__ float wl[kDecWarps][16];
  decode_split<T, D, MT, true, true>(p, wm, wl);
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

struct AppendParams {
  const void* kn;
  const void* vn;
  void* kc;
  void* vc;
  const int* block_table;
  const int* lens;
  int64_t skn[3], svn[3], skc[3], svc[3], sbt;
  int64_t chunks;  // B * Hkv * S_new * (D / W): one W-element piece each
  int Hkv, S_new, D, page_shift, max_pages, num_pages;
};

// Thread i copies piece i: W elements (16 bytes when VEC, else 1) of row (b, h, s) of k_new and v_new
// to row p & (2^page_shift - 1) of page block_table[b, p >> page_shift], p = lens[b] + s; positions
// outside [0, max_pages << page_shift) and page ids outside [0, num_pages) are skipped.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kDecThreads) paged_kv_append_kernel(AppendParams p) {
  constexpr int W = VEC ? 16 / static_cast<int>(sizeof(T)) : 1;
  const int per_row = p.D / W;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kDecThreads + threadIdx.x; i < p.chunks;
       i += static_cast<int64_t>(gridDim.x) * kDecThreads) {
    const int col = static_cast<int>(i % per_row) * W;
    const int64_t row = i / per_row;
    const int s = static_cast<int>(row % p.S_new);
    const int h = static_cast<int>((row / p.S_new) % p.Hkv);
    const int64_t b = row / p.S_new / p.Hkv;
    const int64_t pos = static_cast<int64_t>(p.lens[b]) + s;
    if (pos < 0 || pos >= (static_cast<int64_t>(p.max_pages) << p.page_shift)) continue;
    const int page = p.block_table[b * p.sbt + (pos >> p.page_shift)];
    if (page < 0 || page >= p.num_pages) continue;
    const int64_t slot = pos & ((int64_t{1} << p.page_shift) - 1);
    const T* ks = static_cast<const T*>(p.kn) + b * p.skn[0] + h * p.skn[1] + s * p.skn[2] + col;
    const T* vs = static_cast<const T*>(p.vn) + b * p.svn[0] + h * p.svn[1] + s * p.svn[2] + col;
    T* kd = static_cast<T*>(p.kc) + page * p.skc[0] + h * p.skc[1] + slot * p.skc[2] + col;
    T* vd = static_cast<T*>(p.vc) + page * p.svc[0] + h * p.svc[1] + slot * p.svc[2] + col;
    if constexpr (VEC) {
      *reinterpret_cast<Pack<T, W>*>(kd) = *reinterpret_cast<const Pack<T, W>*>(ks);
      *reinterpret_cast<Pack<T, W>*>(vd) = *reinterpret_cast<const Pack<T, W>*>(vs);
    } else {
      *kd = *ks;
      *vd = *vs;
    }
  }
}

}  // namespace

bool decode_attention_supported(int64_t D, int dtype) {
  return (D == 64 || D == 128 || D == 256) && (dtype == kFloat16 || dtype == kBFloat16);
}

std::vector<std::array<int64_t, 3>> decode_attention_grids(int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq,
                                                           int64_t num_splits) {
  if (B < 1 || Hkv < 1 || Hq < Hkv || Hq % Hkv != 0 || Sq < 1 || Sq > kDecMaxRows || num_splits < 1 ||
      num_splits > kMaxGridYZ)
    return {};
  if ((Hq / Hkv) * Sq > kDecMaxRows) return {};
  const int64_t bk = mul_within(B, Hkv, kMaxGridX);
  const int64_t rows = mul_within(B, Hq * Sq, INT64_MAX / 4);
  if (bk < 0 || rows < 0) return {};
  return {{bk, num_splits, 1}, {min_of(ceil_div<int64_t>(rows, kDecWarps), kMaxGridX), 1, 1}};
}

std::array<int64_t, 2> decode_attention_block(int64_t index, int64_t Hkv) {
  if (index < 0 || index > kMaxGridX || Hkv < 1 || Hkv > kMaxGridX) return {-1, -1};
  const DecodeBlock blk = decode_block(static_cast<int>(index), static_cast<int>(Hkv));
  return {blk.b, blk.hk};
}

int decode_attention_fwd(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t cache_seqlens, uintptr_t out,
                         uintptr_t lse, uintptr_t o_part, uintptr_t lse_part, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t Sq, int64_t S_max, int64_t D, const std::vector<int64_t>& strides, int64_t num_splits,
                         double scale, int64_t window_left, int64_t window_right, int dtype, uintptr_t stream,
                         uintptr_t block_table, int64_t block_table_stride, int64_t page_size, int64_t num_pages,
                         double softcap, uintptr_t alibi_slopes, int64_t alibi_stride_b) {
  if (strides.size() != 14 || Hkv <= 0 || Hq % Hkv != 0 || Sq < 1 || num_splits < 1 || num_splits > kMaxGridYZ ||
      !decode_attention_supported(D, dtype) || !(softcap >= 0.0) || !std::isfinite(softcap) || alibi_stride_b < 0)
    return cudaErrorInvalidValue;
  const bool paged = block_table != 0;
  if (paged && (page_size < 16 || page_size > 256 || (page_size & (page_size - 1)) != 0 || num_pages < 1 ||
                num_pages > INT32_MAX || S_max % page_size != 0 || block_table_stride < S_max / page_size))
    return cudaErrorInvalidValue;
  if (num_splits > 1 && (o_part == 0 || lse_part == 0)) return cudaErrorInvalidValue;  // workspaces needed
  if (B == 0 || Hq == 0) return cudaSuccess;
  const auto grids = decode_attention_grids(B, Hq, Hkv, Sq, num_splits);
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
  p.o = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<float*>(lse);
  set_attention_strides(p, strides);
  p.B = static_cast<int>(B);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.group = static_cast<int>(Hq / Hkv);
  p.Sq = static_cast<int>(Sq);
  p.S_max = static_cast<int>(S_max);
  p.splits = static_cast<int>(num_splits);
  p.has_left = window_left >= 0;
  p.left = static_cast<int>(max_of<int64_t>(min_of<int64_t>(window_left, INT32_MAX / 2), 0));
  p.right = window_right < 0 ? 0 : static_cast<int>(min_of<int64_t>(window_right, 0));
  p.q_vec = aligned_to(q, 16) && strides[0] % 8 == 0 && strides[1] % 8 == 0 && strides[2] % 8 == 0;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.block_table = reinterpret_cast<const int*>(block_table);
  p.sbt = block_table_stride;
  p.num_pages = static_cast<int>(num_pages);
  p.page_shift = 0;
  while (paged && (int64_t{1} << p.page_shift) < page_size) ++p.page_shift;
  p.softcap = static_cast<float>(softcap);
  p.scale = static_cast<float>(scale);
  p.alibi = reinterpret_cast<const float*>(alibi_slopes);
  p.alibi_sb = alibi_stride_b;
  const bool options = softcap > 0.0 || alibi_slopes != 0;
  const CombineParams cp = combine_params(p, B * Hq * Sq);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid = to_dim3(grids[0]);
  const dim3 cgrid = to_dim3(grids[1]);
  const int64_t rows = p.group * Sq;
  return dispatch_half(dtype, [&](auto tt) -> int {
    using T = typename decltype(tt)::type;
    return dispatch_dim<64, 128, 256>(D, [&](auto dd) -> int {
      constexpr int kD = decltype(dd)::value;
      auto split = [&](auto mtc) -> int {
        constexpr int kMT = decltype(mtc)::value;
        constexpr size_t kSmem = DecodeTile<kD, kMT>::kSmem;
        if (options) {
          return launch_smem(paged ? paged_decode_split_options_kernel<T, kD, kMT> : decode_split_options_kernel<T, kD, kMT>,
                             grid, dim3(kDecThreads), kSmem, st, p);
        }
        return launch_smem(paged ? paged_decode_split_kernel<T, kD, kMT> : decode_split_kernel<T, kD, kMT>, grid,
                           dim3(kDecThreads), kSmem, st, p);
      };
      int code;
      if (rows <= 16) {
        code = split(std::integral_constant<int, 1>{});
      } else if (rows <= 32) {
        code = split(std::integral_constant<int, 2>{});
      } else {
        code = split(std::integral_constant<int, 4>{});
      }
      if (code != cudaSuccess || num_splits == 1) return code;
      return launch(decode_combine_kernel<T, kD>, cgrid, dim3(kDecThreads), st, cp);
    });
  });
}

int paged_kv_append(uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_table, uintptr_t cache_seqlens, uintptr_t k_new,
                    uintptr_t v_new, int64_t B, int64_t Hkv, int64_t S_new, int64_t D, int64_t page_size, int64_t max_pages,
                    int64_t num_pages, const std::vector<int64_t>& strides, int dtype, uintptr_t stream) {
  if (strides.size() != 13 || B < 0 || Hkv < 0 || S_new < 0 || D < 1 || page_size < 1 || page_size > (1 << 30) ||
      (page_size & (page_size - 1)) != 0 || max_pages < 0 || max_pages > INT32_MAX || num_pages < 0 ||
      num_pages > INT32_MAX || Hkv > INT32_MAX || S_new > INT32_MAX || D > INT32_MAX)
    return cudaErrorInvalidValue;
  const int64_t rows = mul_within(mul_within(B, Hkv, INT64_MAX), S_new, INT64_MAX / (D + 1));
  if (rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  AppendParams p{};
  p.kn = reinterpret_cast<const void*>(k_new);
  p.vn = reinterpret_cast<const void*>(v_new);
  p.kc = reinterpret_cast<void*>(k_cache);
  p.vc = reinterpret_cast<void*>(v_cache);
  p.block_table = reinterpret_cast<const int*>(block_table);
  p.lens = reinterpret_cast<const int*>(cache_seqlens);
  for (int i = 0; i < 3; ++i) {
    p.skn[i] = strides[i];
    p.svn[i] = strides[3 + i];
    p.skc[i] = strides[6 + i];
    p.svc[i] = strides[9 + i];
  }
  p.sbt = strides[12];
  p.Hkv = static_cast<int>(Hkv);
  p.S_new = static_cast<int>(S_new);
  p.D = static_cast<int>(D);
  p.max_pages = static_cast<int>(max_pages);
  p.num_pages = static_cast<int>(num_pages);
  while ((int64_t{1} << p.page_shift) < page_size) ++p.page_shift;
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  auto run = [&](auto tt) -> int {
    using T = typename decltype(tt)::type;
    constexpr int64_t kW = 16 / sizeof(T);
    bool vec = D % kW == 0;
    for (int i = 0; i < 12; ++i) vec = vec && strides[i] % kW == 0;
    for (uintptr_t ptr_v : {k_cache, v_cache, k_new, v_new}) vec = vec && aligned_to(ptr_v, 16);
    p.chunks = rows * (vec ? D / kW : D);
    const dim3 grid(static_cast<unsigned>(min_of<int64_t>(ceil_div<int64_t>(p.chunks, kDecThreads), kMaxGridX)));
    return dispatch_bool(vec, [&](auto vv) -> int {
      return launch(paged_kv_append_kernel<T, decltype(vv)::value>, grid, dim3(kDecThreads), st, p);
    });
  };
  if (dtype == kFloat32) return run(TypeTag<float>{});
  return dispatch_half(dtype, run);
}

}  // namespace fastlm
