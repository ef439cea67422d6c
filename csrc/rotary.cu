// Rotary position embedding (RoPE) of q and k in one launch, forward and backward, fp32/fp16/bf16.
//
// Pair p of the first R = rotary_dim dims of each head turns by a = pos * theta^(-2p/R):
//   forward:   o1 = x1 cos1 - x2 sin1,   o2 = x2 cos2 + x1 sin2
//   backward:  o1 = x1 cos1 + x2 sin2,   o2 = x2 cos2 - x1 sin1      (the transpose; rotation by -a)
// with (x1, x2) at columns (p, p + R/2) (half split) or (2p, 2p + 1) (interleaved). In the angle
// form cos1 = cos2 = cos(a), sin1 = sin2 = sin(a); in the table form (Hugging Face's
// apply_rotary_pos_emb) they are read from cos/sin tables (B or 1, S, R) at columns c1 and c2.
//
// Two paths, the launcher chooses (rotary_vector_ok). Both: one thread owns a (position, pairs)
// unit and walks every head of q and then k, so cos/sin are formed once per (position, pair) and
// reused Hq + Hk times, and each element of q and k is read once and written once.
// - vector (rows 16-byte aligned, unit-stride d, row strides and R, D in whole 16-byte chunks): a
//   unit is one 16-byte chunk of V = 16 / sizeof(T) columns: half split, x1 at [c, c + V) and x2 at
//   [c + R/2, c + R/2 + V) (V pairs); interleaved, the V/2 pairs (2i, 2i + 1) inside [c, c + V).
//   128-bit loads and stores, kLoadsInFlight chunks (4 heads interleaved, 2 half split) loaded
//   before any is written.
// - any-stride (the fallback): a unit is one pair, scalar accesses (any strides, any layout:
//   (B, H, S, D) or (B, S, H, D) storage, sliced views); consecutive threads take consecutive
//   pairs, so a warp touches contiguous columns.
// The per-pair arithmetic (rotate_pair, angle_cos_sin) is shared, so both paths give bit-identical
// results. Angles are exact to fp32 at any position: theta^(-2p/R) and
// pos * inv_freq / pi in fp64, reduced exactly to [-1, 1], then sincospif (no further reduction;
// fp32 math on pos * inv_freq would be off by up to 0.03 rad at position 131072). Outputs may be
// the inputs (in place): every element is read before it is written, by the same thread. Dims
// R..D-1 are copied when the output is not the input.

#include <array>
#include <cmath>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr int kThreads = 128;
constexpr int kLoadsInFlight = 4;  // 16-byte loads of q/k per thread before any store (vector path)
constexpr double kInvPi = 0.3183098861837907;  // 1/pi

struct RotaryArgs {
  const void* q;
  const void* k;
  void* q_out;
  void* k_out;
  const void* pos;  // int32/int64 positions (pos_bits), or null: pos = offset + s
  const void* cos;  // tables (table form only)
  const void* sin;
  int64_t S, HQ, HK, D, R, half;
  int64_t sq[4], sk[4], sqo[4], sko[4];  // (b, h, s, d) element strides
  int64_t spos[2];                       // (b, s); b stride 0 when broadcast
  int64_t scos[3], ssin[3];              // (b, s, d); b stride 0 when broadcast
  int64_t offset;
  int64_t heads_per_block;
  int64_t chunks, copy_chunks;  // vector path: 16-byte rotation / pass-through chunks per row
  int B, sblocks;  // batch, position blocks
  double log2_theta;
  int pos_bits;
  bool interleaved, backward, copy_pass;
};

// cos and sin of a = pos * 2^(-(2p/R) * log2(theta)), exact to fp32 for any int64 position: a/pi in
// fp64, reduced exactly to u in [-1, 1] (a = pi * u + 2 pi k), then sincospif(u), which needs no
// further argument reduction.
__device__ __forceinline__ void angle_cos_sin(int64_t pos, int64_t p, int64_t R, double log2_theta, float* c,
                                              float* s) {
  const double inv_freq = exp2(-(2.0 * static_cast<double>(p) / static_cast<double>(R)) * log2_theta);
  double u = static_cast<double>(pos) * inv_freq * kInvPi;
  u -= 2.0 * rint(0.5 * u);
  sincospif(static_cast<float>(u), s, c);
}

__device__ __forceinline__ void rotate_pair(float x1, float x2, float cos1, float cos2, float sin1, float sin2,
                                            bool backward, float& o1, float& o2) {
  if (backward) {
    o1 = x1 * cos1 + x2 * sin2;
    o2 = x2 * cos2 - x1 * sin1;
  } else {
    o1 = x1 * cos1 - x2 * sin1;
    o2 = x2 * cos2 + x1 * sin2;
  }
}

// Rotates pair (c1, c2) of heads [h_begin, h_end) of one tensor at (b, s).
template <typename T>
__device__ __forceinline__ void rotate_heads(const T* x, T* o, const int64_t (&si)[4], const int64_t (&so)[4],
                                             int64_t b, int64_t s, int64_t h_begin, int64_t h_end, int64_t c1,
                                             int64_t c2, float cos1, float cos2, float sin1, float sin2,
                                             bool backward) {
  for (int64_t h = h_begin; h < h_end; ++h) {
    const T* xr = x + b * si[0] + h * si[1] + s * si[2];
    T* orow = o + b * so[0] + h * so[1] + s * so[2];
    float o1, o2;
    rotate_pair(to_float(xr[c1 * si[3]]), to_float(xr[c2 * si[3]]), cos1, cos2, sin1, sin2, backward, o1, o2);
    orow[c1 * so[3]] = from_float<T>(o1);
    orow[c2 * so[3]] = from_float<T>(o2);
  }
}

template <typename T>
__device__ __forceinline__ void copy_heads(const T* x, T* o, const int64_t (&si)[4], const int64_t (&so)[4],
                                           int64_t b, int64_t s, int64_t h_begin, int64_t h_end, int64_t col) {
  for (int64_t h = h_begin; h < h_end; ++h)
    o[b * so[0] + h * so[1] + s * so[2] + col * so[3]] = x[b * si[0] + h * si[1] + s * si[2] + col * si[3]];
}

// The blocks lie on grid x (2^31 - 1 blocks; y and z stop at 65535): block index
// (group * B + b) * sblocks + sblock.
struct RotaryBlock {
  int sblock, b, group;
};

__host__ __device__ __forceinline__ RotaryBlock rotary_block_of(int index, int B, int sblocks) {
  const int gb = index / sblocks;
  return {index - gb * sblocks, gb % B, gb / B};
}

// The q heads [q_begin, q_end) and k heads [k_begin, k_end) of head group `group` of q ++ k.
struct HeadRange {
  int64_t q_begin, q_end, k_begin, k_end;
};

__device__ __forceinline__ HeadRange rotary_heads(const RotaryArgs& a, int group) {
  const int64_t h0 = static_cast<int64_t>(group) * a.heads_per_block;
  const int64_t h1 = min_of<int64_t>(h0 + a.heads_per_block, a.HQ + a.HK);
  return {h0, min_of<int64_t>(h1, a.HQ), max_of<int64_t>(h0, a.HQ) - a.HQ, h1 - a.HQ};
}

// The angle form's position of row s of batch b: offset + s, or offset + positions[b, s].
__device__ __forceinline__ int64_t rotary_position(const RotaryArgs& a, int64_t b, int64_t s) {
  if (a.pos == nullptr) return a.offset + s;
  const int64_t i = b * a.spos[0] + s * a.spos[1];
  return a.offset + (a.pos_bits == 64 ? static_cast<const int64_t*>(a.pos)[i]
                                      : static_cast<int64_t>(static_cast<const int32_t*>(a.pos)[i]));
}

// Block (sblock, b, group): positions s = sblock * blockDim.y + threadIdx.y, pairs p = threadIdx.x,
// + blockDim.x, ..., heads [group * heads_per_block, ...) of the concatenation q ++ k.
// At least 4 blocks per SM: registers capped at 128, where the instantiations fit without spilling;
// ptxas's default target (96) spilled.
template <typename T, typename C, bool TABLE>
__global__ void __launch_bounds__(kThreads, 4) rotary_kernel(const RotaryArgs a) {
  const RotaryBlock blk = rotary_block_of(static_cast<int>(blockIdx.x), a.B, a.sblocks);
  const int64_t s = static_cast<int64_t>(blk.sblock) * blockDim.y + threadIdx.y;
  const int64_t b = blk.b;
  if (s >= a.S) return;
  const HeadRange hr = rotary_heads(a, blk.group);
  const int64_t q_begin = hr.q_begin, q_end = hr.q_end, k_begin = hr.k_begin, k_end = hr.k_end;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  T* qo = static_cast<T*>(a.q_out);
  T* ko = static_cast<T*>(a.k_out);

  const int64_t pos = TABLE ? 0 : rotary_position(a, b, s);
  for (int64_t p = threadIdx.x; p < a.half; p += blockDim.x) {
    const int64_t c1 = a.interleaved ? 2 * p : p;
    const int64_t c2 = a.interleaved ? 2 * p + 1 : p + a.half;
    float cos1, cos2, sin1, sin2;
    if (TABLE) {
      const C* ct = static_cast<const C*>(a.cos) + b * a.scos[0] + s * a.scos[1];
      const C* st = static_cast<const C*>(a.sin) + b * a.ssin[0] + s * a.ssin[1];
      cos1 = to_float(ct[c1 * a.scos[2]]);
      cos2 = to_float(ct[c2 * a.scos[2]]);
      sin1 = to_float(st[c1 * a.ssin[2]]);
      sin2 = to_float(st[c2 * a.ssin[2]]);
    } else {
      angle_cos_sin(pos, p, a.R, a.log2_theta, &cos1, &sin1);
      cos2 = cos1;
      sin2 = sin1;
    }
    rotate_heads<T>(q, qo, a.sq, a.sqo, b, s, q_begin, q_end, c1, c2, cos1, cos2, sin1, sin2, a.backward);
    rotate_heads<T>(k, ko, a.sk, a.sko, b, s, k_begin, k_end, c1, c2, cos1, cos2, sin1, sin2, a.backward);
  }
  if (a.copy_pass) {
    for (int64_t col = a.R + threadIdx.x; col < a.D; col += blockDim.x) {
      copy_heads<T>(q, qo, a.sq, a.sqo, b, s, q_begin, q_end, col);
      copy_heads<T>(k, ko, a.sk, a.sko, b, s, k_begin, k_end, col);
    }
  }
}

// Vector path: NP pairs of one 16-byte chunk per thread. Half split (INTERLEAVED false): pair j
// is (x1[j], x2[j]) of the chunks at columns c and c + R/2; interleaved: (x[2j], x[2j + 1]) of the
// one chunk at column c. N heads [h, h + N) of one tensor at (b, s): all loads, then all stores.
template <typename T, bool INTERLEAVED, int N>
__device__ __forceinline__ void rotate_heads_vec(const T* x, T* o, const int64_t (&si)[4], const int64_t (&so)[4],
                                                 int64_t b, int64_t s, int64_t h, int64_t c1, int64_t c2,
                                                 const float* cos1, const float* cos2, const float* sin1,
                                                 const float* sin2, bool backward) {
  constexpr int V = kMaxVec<T>;
  constexpr int NP = INTERLEAVED ? V / 2 : V;
  Pack<T, V> p1[N], p2[N];
#pragma unroll
  for (int n = 0; n < N; ++n) {
    const T* xr = x + b * si[0] + (h + n) * si[1] + s * si[2];
    p1[n] = *reinterpret_cast<const Pack<T, V>*>(xr + c1);
    if (!INTERLEAVED) p2[n] = *reinterpret_cast<const Pack<T, V>*>(xr + c2);
  }
#pragma unroll
  for (int n = 0; n < N; ++n) {
    T* orow = o + b * so[0] + (h + n) * so[1] + s * so[2];
    Pack<T, V> q1, q2;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const int j1 = INTERLEAVED ? 2 * j : j;
      const int j2 = INTERLEAVED ? 2 * j + 1 : j;
      const T x2 = INTERLEAVED ? p1[n].v[j2] : p2[n].v[j2];
      float o1, o2;
      rotate_pair(to_float(p1[n].v[j1]), to_float(x2), cos1[j], cos2[j], sin1[j], sin2[j], backward, o1, o2);
      q1.v[j1] = from_float<T>(o1);
      if (INTERLEAVED)
        q1.v[j2] = from_float<T>(o2);
      else
        q2.v[j2] = from_float<T>(o2);
    }
    *reinterpret_cast<Pack<T, V>*>(orow + c1) = q1;
    if (!INTERLEAVED) *reinterpret_cast<Pack<T, V>*>(orow + c2) = q2;
  }
}

template <typename T, bool INTERLEAVED>
__device__ __forceinline__ void rotate_all_heads_vec(const T* x, T* o, const int64_t (&si)[4],
                                                     const int64_t (&so)[4], int64_t b, int64_t s, int64_t h_begin,
                                                     int64_t h_end, int64_t c1, int64_t c2, const float* cos1,
                                                     const float* cos2, const float* sin1, const float* sin2,
                                                     bool backward) {
  constexpr int F = INTERLEAVED ? kLoadsInFlight : kLoadsInFlight / 2;
  int64_t h = h_begin;
  for (; h + F <= h_end; h += F)
    rotate_heads_vec<T, INTERLEAVED, F>(x, o, si, so, b, s, h, c1, c2, cos1, cos2, sin1, sin2, backward);
  for (; h < h_end; ++h)
    rotate_heads_vec<T, INTERLEAVED, 1>(x, o, si, so, b, s, h, c1, c2, cos1, cos2, sin1, sin2, backward);
}

template <typename T>
__device__ __forceinline__ void copy_heads_vec(const T* x, T* o, const int64_t (&si)[4], const int64_t (&so)[4],
                                               int64_t b, int64_t s, int64_t h_begin, int64_t h_end, int64_t col) {
  constexpr int V = kMaxVec<T>;
  for (int64_t h = h_begin; h < h_end; ++h)
    *reinterpret_cast<Pack<T, V>*>(o + b * so[0] + h * so[1] + s * so[2] + col) =
        *reinterpret_cast<const Pack<T, V>*>(x + b * si[0] + h * si[1] + s * si[2] + col);
}

// The block layout of rotary_kernel with units = 16-byte chunks: threadIdx.x walks the a.chunks
// rotation chunks, then the a.copy_chunks pass-through chunks (column R + V * u). The interleaved
// table form reads the chunk's V table columns at once: pair j takes columns (2j, 2j + 1).
template <typename T, typename C, bool TABLE, bool INTERLEAVED>
__global__ void __launch_bounds__(kThreads, 4) rotary_vec_kernel(const RotaryArgs a) {
  constexpr int V = kMaxVec<T>;
  constexpr int NP = INTERLEAVED ? V / 2 : V;
  const RotaryBlock blk = rotary_block_of(static_cast<int>(blockIdx.x), a.B, a.sblocks);
  const int64_t s = static_cast<int64_t>(blk.sblock) * blockDim.y + threadIdx.y;
  const int64_t b = blk.b;
  if (s >= a.S) return;
  const HeadRange hr = rotary_heads(a, blk.group);
  const int64_t q_begin = hr.q_begin, q_end = hr.q_end, k_begin = hr.k_begin, k_end = hr.k_end;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  T* qo = static_cast<T*>(a.q_out);
  T* ko = static_cast<T*>(a.k_out);

  const int64_t pos = TABLE ? 0 : rotary_position(a, b, s);
  for (int64_t u = threadIdx.x; u < a.chunks; u += blockDim.x) {
    const int64_t c1 = u * V;
    const int64_t c2 = INTERLEAVED ? c1 : c1 + a.half;
    float cos1[NP], cos2[NP], sin1[NP], sin2[NP];
    if constexpr (TABLE) {
      const C* ct = static_cast<const C*>(a.cos) + b * a.scos[0] + s * a.scos[1];
      const C* st = static_cast<const C*>(a.sin) + b * a.ssin[0] + s * a.ssin[1];
      if constexpr (INTERLEAVED) {
        float cv[V], sv[V];
        load_float<C, V>(ct + c1, cv);
        load_float<C, V>(st + c1, sv);
#pragma unroll
        for (int j = 0; j < NP; ++j) {
          cos1[j] = cv[2 * j];
          cos2[j] = cv[2 * j + 1];
          sin1[j] = sv[2 * j];
          sin2[j] = sv[2 * j + 1];
        }
      } else {
        load_float<C, NP>(ct + c1, cos1);
        load_float<C, NP>(ct + c2, cos2);
        load_float<C, NP>(st + c1, sin1);
        load_float<C, NP>(st + c2, sin2);
      }
    } else {
      const int64_t p0 = INTERLEAVED ? c1 / 2 : c1;
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        angle_cos_sin(pos, p0 + j, a.R, a.log2_theta, &cos1[j], &sin1[j]);
        cos2[j] = cos1[j];
        sin2[j] = sin1[j];
      }
    }
    rotate_all_heads_vec<T, INTERLEAVED>(q, qo, a.sq, a.sqo, b, s, q_begin, q_end, c1, c2, cos1, cos2, sin1, sin2,
                                         a.backward);
    rotate_all_heads_vec<T, INTERLEAVED>(k, ko, a.sk, a.sko, b, s, k_begin, k_end, c1, c2, cos1, cos2, sin1, sin2,
                                         a.backward);
  }
  for (int64_t u = threadIdx.x; u < a.copy_chunks; u += blockDim.x) {
    copy_heads_vec<T>(q, qo, a.sq, a.sqo, b, s, q_begin, q_end, a.R + u * V);
    copy_heads_vec<T>(k, ko, a.sk, a.sko, b, s, k_begin, k_end, a.R + u * V);
  }
}

template <typename F>
int dispatch_rotary_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32:
      return f(TypeTag<float>{});
    case kFloat16:
      return f(TypeTag<__half>{});
    case kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      return cudaErrorInvalidValue;
  }
}

int rotary_next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

// Launch shape: threads (bx units, by positions), bx * by = kThreads; sblocks position blocks and
// enough head groups that the grid covers about 4 blocks per SM. blocks = 0 when the grid does not
// fit (more than 2^31 - 1 blocks).
struct RotaryPlan {
  int bx, by;
  int64_t sblocks, groups, heads_per_block, blocks;
};

RotaryPlan plan_rotary(int64_t B, int64_t S, int64_t H, int64_t units, int64_t sms) {
  RotaryPlan r{};
  r.bx = static_cast<int>(min_of<int64_t>(kThreads, rotary_next_pow2(units)));
  r.by = kThreads / r.bx;
  r.sblocks = ceil_div<int64_t>(S, r.by);
  const int64_t sb = mul_within(r.sblocks, B, kMaxGridX);
  if (sb < 0) return r;
  const int64_t target = 4 * max_of<int64_t>(sms, 1);
  r.groups = min_of<int64_t>(H, max_of<int64_t>(1, ceil_div<int64_t>(target, sb)));
  r.heads_per_block = ceil_div<int64_t>(H, r.groups);
  r.groups = ceil_div<int64_t>(H, r.heads_per_block);
  r.blocks = max_of<int64_t>(mul_within(sb, r.groups, kMaxGridX), 0);
  return r;
}

bool rotary_sizes_ok(int64_t B, int64_t S, int64_t HQ, int64_t HK, int64_t rotary_dim) {
  return B >= 1 && S >= 1 && HQ >= 0 && HK >= 0 && HQ + HK >= 1 && rotary_dim >= 2;
}

int rotary_elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// A (b, h, s, d) tensor of element size `es` whose rows start 16-byte aligned: aligned base,
// unit-stride d, and every stride of a dim longer than 1 a whole number of 16-byte chunks.
bool rows_aligned(uintptr_t p, const int64_t* st, const int64_t (&sizes)[3], int es) {
  if (!aligned_to(p, 16) || st[3] != 1) return false;
  for (int i = 0; i < 3; ++i)
    if (sizes[i] > 1 && (st[i] * es) % 16 != 0) return false;
  return true;
}

}  // namespace

bool rotary_vector_ok(uintptr_t q, uintptr_t k, uintptr_t q_out, uintptr_t k_out, uintptr_t cos, uintptr_t sin,
                      int table_dtype, int64_t B, int64_t S, int64_t HQ, int64_t HK, int64_t D, int64_t rotary_dim,
                      const std::vector<int64_t>& strides, bool interleaved, int dtype) {
  if (strides.size() != 24 || rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > D) return false;
  const int es = rotary_elem_size(dtype);
  const int64_t V = 16 / es;
  if ((interleaved ? rotary_dim : rotary_dim / 2) % V != 0 || D % V != 0) return false;
  const int64_t qs[3] = {B, HQ, S}, ks[3] = {B, HK, S};
  if (HQ > 0 && !(rows_aligned(q, &strides[0], qs, es) && rows_aligned(q_out, &strides[8], qs, es))) return false;
  if (HK > 0 && !(rows_aligned(k, &strides[4], ks, es) && rows_aligned(k_out, &strides[12], ks, es))) return false;
  if (cos != 0 || sin != 0) {
    const int ts = rotary_elem_size(table_dtype);
    const int64_t tsz[3] = {B, S, 1};
    const int64_t cst[4] = {strides[18], strides[19], 0, strides[20]};
    const int64_t sst[4] = {strides[21], strides[22], 0, strides[23]};
    if (!rows_aligned(cos, cst, tsz, ts) || !rows_aligned(sin, sst, tsz, ts)) return false;
  }
  return true;
}

std::vector<std::array<int64_t, 3>> rotary_grids(int64_t B, int64_t S, int64_t HQ, int64_t HK, int64_t rotary_dim,
                                                 int64_t sms) {
  if (!rotary_sizes_ok(B, S, HQ, HK, rotary_dim)) return {};
  const RotaryPlan r = plan_rotary(B, S, HQ + HK, rotary_dim / 2, sms);
  if (r.blocks == 0) return {};
  return {{r.blocks, 1, 1}};
}

std::array<int64_t, 3> rotary_block(int64_t index, int64_t B, int64_t S, int64_t HQ, int64_t HK, int64_t rotary_dim,
                                    int64_t sms) {
  if (!rotary_sizes_ok(B, S, HQ, HK, rotary_dim)) return {-1, -1, -1};
  const RotaryPlan r = plan_rotary(B, S, HQ + HK, rotary_dim / 2, sms);
  if (index < 0 || index >= r.blocks) return {-1, -1, -1};
  const RotaryBlock blk = rotary_block_of(static_cast<int>(index), static_cast<int>(B), static_cast<int>(r.sblocks));
  return {blk.sblock, blk.b, blk.group};
}

int rotary(uintptr_t q, uintptr_t k, uintptr_t q_out, uintptr_t k_out, uintptr_t positions, int pos_bits,
           uintptr_t cos, uintptr_t sin, int table_dtype, int64_t B, int64_t S, int64_t HQ, int64_t HK, int64_t D,
           int64_t rotary_dim, const std::vector<int64_t>& strides, int64_t offset, double theta, bool interleaved,
           bool backward, int dtype, uintptr_t stream) {
  if (B < 0 || S < 0 || HQ < 0 || HK < 0 || D < 0) return cudaErrorInvalidValue;
  if (B == 0 || S == 0 || HQ + HK == 0 || D == 0) return cudaSuccess;
  if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > D) return cudaErrorInvalidValue;
  if (strides.size() != 24) return cudaErrorInvalidValue;
  if ((HQ > 0 && (q == 0 || q_out == 0)) || (HK > 0 && (k == 0 || k_out == 0))) return cudaErrorInvalidValue;
  const bool table = cos != 0 || sin != 0;
  if (table && (cos == 0 || sin == 0)) return cudaErrorInvalidValue;
  if (!table && (!(theta > 0.0) || (positions != 0 && pos_bits != 32 && pos_bits != 64))) return cudaErrorInvalidValue;
  const auto code_ok = [](int c) { return c == kFloat32 || c == kFloat16 || c == kBFloat16; };
  if (!code_ok(dtype) || (table && !code_ok(table_dtype))) return cudaErrorInvalidValue;

  RotaryArgs a{};
  a.q = reinterpret_cast<const void*>(q);
  a.k = reinterpret_cast<const void*>(k);
  a.q_out = reinterpret_cast<void*>(q_out);
  a.k_out = reinterpret_cast<void*>(k_out);
  a.pos = table ? nullptr : reinterpret_cast<const void*>(positions);
  a.cos = reinterpret_cast<const void*>(cos);
  a.sin = reinterpret_cast<const void*>(sin);
  a.S = S, a.HQ = HQ, a.HK = HK, a.D = D, a.R = rotary_dim, a.half = rotary_dim / 2;
  for (int i = 0; i < 4; ++i) {
    a.sq[i] = strides[i];
    a.sk[i] = strides[4 + i];
    a.sqo[i] = strides[8 + i];
    a.sko[i] = strides[12 + i];
  }
  a.spos[0] = strides[16], a.spos[1] = strides[17];
  for (int i = 0; i < 3; ++i) {
    a.scos[i] = strides[18 + i];
    a.ssin[i] = strides[21 + i];
  }
  a.offset = offset;
  a.log2_theta = table ? 0.0 : std::log2(theta);
  a.pos_bits = pos_bits;
  a.interleaved = interleaved;
  a.backward = backward;
  a.copy_pass = rotary_dim < D && (q_out != q || k_out != k);

  const bool vec = rotary_vector_ok(q, k, q_out, k_out, cos, sin, table_dtype, B, S, HQ, HK, D, rotary_dim, strides,
                                    interleaved, dtype);
  const int64_t V = 16 / rotary_elem_size(dtype);
  a.chunks = (interleaved ? rotary_dim : rotary_dim / 2) / V;
  a.copy_chunks = a.copy_pass ? (D - rotary_dim) / V : 0;

  int sms = 0;
  cudaError_t err = current_sm_count(&sms);
  if (err != cudaSuccess) return err;
  const RotaryPlan r = plan_rotary(B, S, HQ + HK, vec ? max_of<int64_t>(a.chunks, a.copy_chunks) : rotary_dim / 2, sms);
  if (r.blocks == 0) return cudaErrorInvalidValue;
  a.heads_per_block = r.heads_per_block;
  a.B = static_cast<int>(B);
  a.sblocks = static_cast<int>(r.sblocks);
  const dim3 grid(static_cast<unsigned>(r.blocks));
  const dim3 block(r.bx, r.by);
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);

  return dispatch_rotary_dtype(dtype, [&](auto tt) -> int {
    using T = typename decltype(tt)::type;
    if (!vec) {
      if (!table) return launch(rotary_kernel<T, float, false>, grid, block, st, a);
      return dispatch_rotary_dtype(table_dtype, [&](auto ct) -> int {
        using C = typename decltype(ct)::type;
        return launch(rotary_kernel<T, C, true>, grid, block, st, a);
      });
    }
    if (table)
      return dispatch_rotary_dtype(table_dtype, [&](auto ct) -> int {
        using C = typename decltype(ct)::type;
        if (interleaved) return launch(rotary_vec_kernel<T, C, true, true>, grid, block, st, a);
        return launch(rotary_vec_kernel<T, C, true, false>, grid, block, st, a);
      });
    if (interleaved) return launch(rotary_vec_kernel<T, float, false, true>, grid, block, st, a);
    return launch(rotary_vec_kernel<T, float, false, false>, grid, block, st, a);
  });
}

}  // namespace fastlm
