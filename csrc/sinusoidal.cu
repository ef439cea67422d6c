// Sinusoidal position encoding and the fused token embedding + encoding, forward and backward,
// fp32/fp16/bf16 outputs, int32/int64 ids and positions.
//
//   PE(pos, j)      = sin(pos * base^(-2i/d)) for j = 2i,  cos(pos * base^(-2i/d)) for j = 2i + 1
//   out[t, s, j]    = weight[ids[t, s], j] * scale + PE(pos[t, s], j)      (or PE alone: the table)
//   dweight[v, j]   = scale * sum over tokens with ids == v of dout[t, s, j]
//
// Trade-off (forward): base^(-2i/d) is formed once per column in fp64 and reused for every token
// a thread handles; the angle is formed in fp64 and reduced exactly (a / pi mod 2), then one
// sinpif per element: exact to fp32 at any position. Each weight row slice is read once and each
// output element written once. An id outside [0, V) is never read: its output row is NaN. Two
// paths, the launcher chooses; the per-element arithmetic (pe_value) is shared, so they agree bit
// for bit:
// - vector (out and weight rows 16-byte aligned with unit-stride d, D a multiple of the
//   16-byte element count VEC): a thread owns VEC consecutive columns of kTokensPerThread tokens,
//   a block (bx column chunks, by token rows) several tokens in parallel; 128-bit weight loads and
//   output stores, all of a thread's ids and weight chunks loaded before any store.
// - any-stride (the fallback): a block owns kTokens tokens and a thread a column j, walked in turn.
//
// Backward, two modes: atomic (rows added into an fp32 gradient by per-element atomic adds; the
// order of the adds varies between runs; a vector path, a thread per VEC columns of kTokensPerThread
// tokens with 16-byte dout loads, and the any-stride fallback, a block per kTokens tokens and a
// thread per column), and sorted (ids sorted stably beforehand), a segmented
// reduction in two passes: the sorted positions split into chunks of kChunkRows, a thread per
// (chunk, VEC columns) sums each run segment of its chunk in order and writes a whole run's row once,
// the partials of runs crossing a chunk edge go to an fp32 workspace, and a thread per (chunk where
// such a run starts, VEC columns) adds them in chunk order. No atomics and no order that depends on
// the schedule: bit-identical across runs, and a run of n equal ids costs n / kChunkRows dependent
// adds instead of n. Out-of-range ids contribute nothing.

#include <cmath>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr int kThreads = 128;
constexpr int kTokens = 16;
constexpr int kTokensPerThread = 4;  // vector path
constexpr int kChunkRows = 32;  // sorted backward: sorted positions per chunk
constexpr int kChunkBatch = 8;  // sorted backward: rows loaded before any is added
constexpr double kInvPi = 0.3183098861837907;

__device__ __forceinline__ int64_t load_index(const void* p, int bits, int64_t i) {
  return bits == 64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

struct EmbedArgs {
  const void* ids;  // (T, S), or null for the table alone
  const void* weight;  // (V, D)
  const void* pos;  // (T or 1, S), or null: pos = offset + s
  void* out;  // (T, S, D)
  int64_t N, S, D, V;
  int64_t s_it, s_is, s_w0, s_w1, s_pt, s_ps, s_ot, s_os, s_od;
  int64_t offset;
  float scale;
  double log2_base;
  int ids_bits, pos_bits;
  bool has_scale;
};

// out[n, j] before the weight term: sin(pi * u) with u = pos * inv_freq_over_pi + shift reduced
// exactly to [-1, 1].
__device__ __forceinline__ float pe_value(int64_t pos, double inv_freq_over_pi, double shift) {
  double u = static_cast<double>(pos) * inv_freq_over_pi + shift;
  u -= 2.0 * rint(0.5 * u);
  return sinpif(static_cast<float>(u));
}

__device__ __forceinline__ double pe_inv_freq_over_pi(int64_t j, int64_t D, double log2_base) {
  return exp2(-(2.0 * static_cast<double>(j / 2) / static_cast<double>(D)) * log2_base) * kInvPi;
}

__device__ __forceinline__ float embed_add(float pe, float x, bool has_scale, float scale) {
  return pe + (has_scale ? x * scale : x);
}

// Block (blockIdx.x, blockIdx.y): tokens n in [blockIdx.x * kTokens, + kTokens), columns j =
// blockIdx.y * blockDim.x + threadIdx.x.
template <typename T>
__global__ void __launch_bounds__(kThreads) embed_sinusoidal_fwd_kernel(const EmbedArgs a) {
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= a.D) return;
  const double inv_freq_over_pi = pe_inv_freq_over_pi(j, a.D, a.log2_base);
  const double shift = (j & 1) ? 0.5 : 0.0;  // cos(x) = sin(x + pi/2)
  const int64_t n_end = min_of<int64_t>(static_cast<int64_t>(blockIdx.x + 1) * kTokens, a.N);
  const T* w = static_cast<const T*>(a.weight);
  T* out = static_cast<T*>(a.out);
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kTokens; n < n_end; ++n) {
    const int64_t t = n / a.S, s = n - t * a.S;
    const int64_t pos = a.offset + (a.pos != nullptr ? load_index(a.pos, a.pos_bits, t * a.s_pt + s * a.s_ps) : s);
    float v = pe_value(pos, inv_freq_over_pi, shift);
    if (a.ids != nullptr) {
      const int64_t id = load_index(a.ids, a.ids_bits, t * a.s_it + s * a.s_is);
      if (id >= 0 && id < a.V) {
        v = embed_add(v, to_float(w[id * a.s_w0 + j * a.s_w1]), a.has_scale, a.scale);
      } else {
        v = __int_as_float(0x7fc00000);  // NaN
      }
    }
    out[t * a.s_ot + s * a.s_os + j * a.s_od] = from_float<T>(v);
  }
}

// 16 bytes of T from fp32 at p (16-byte aligned) as one 128-bit store. The value is built as one
// unsigned __int128 (element 0 in the low bits): nvcc splits a uint4 or Pack store here into
// 32-bit stores.
template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&v)[kMaxVec<T>]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4)
      w[i] = __float_as_uint(v[i]);
    else
      w[i] = pack_float<T>(v[2 * i], v[2 * i + 1]);
  }
  const uint64_t lo = (static_cast<uint64_t>(w[1]) << 32) | w[0], hi = (static_cast<uint64_t>(w[3]) << 32) | w[2];
  *reinterpret_cast<unsigned __int128*>(p) = (static_cast<unsigned __int128>(hi) << 64) | lo;
}

// Vector path. Block (blockIdx.x, blockIdx.y), threads (bx, by): columns [j0, j0 + VEC) with
// j0 = VEC * (blockIdx.y * bx + threadIdx.x); tokens n = (blockIdx.x * kTokensPerThread + r) * by
// + threadIdx.y for r < kTokensPerThread.
template <typename T>
__global__ void __launch_bounds__(kThreads) embed_sinusoidal_fwd_vec_kernel(const EmbedArgs a) {
  constexpr int VEC = kMaxVec<T>;
  const int64_t j0 = VEC * (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x);
  if (j0 >= a.D) return;
  double inv_freq_over_pi[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) inv_freq_over_pi[e] = pe_inv_freq_over_pi(j0 + e, a.D, a.log2_base);
  const T* w = static_cast<const T*>(a.weight);
  T* out = static_cast<T*>(a.out);
  int64_t ts[kTokensPerThread], ss[kTokensPerThread], id[kTokensPerThread];
  Pack<T, VEC> x[kTokensPerThread];
#pragma unroll
  for (int r = 0; r < kTokensPerThread; ++r) {
    const int64_t n = (static_cast<int64_t>(blockIdx.x) * kTokensPerThread + r) * blockDim.y + threadIdx.y;
    ts[r] = n < a.N ? n / a.S : -1;
    ss[r] = n - ts[r] * a.S;
    id[r] = -1;
    if (ts[r] >= 0 && a.ids != nullptr) {
      id[r] = load_index(a.ids, a.ids_bits, ts[r] * a.s_it + ss[r] * a.s_is);
      if (id[r] >= 0 && id[r] < a.V) x[r] = *reinterpret_cast<const Pack<T, VEC>*>(w + id[r] * a.s_w0 + j0);
    }
  }
#pragma unroll
  for (int r = 0; r < kTokensPerThread; ++r) {
    if (ts[r] < 0) continue;
    const int64_t t = ts[r], s = ss[r];
    const int64_t pos = a.offset + (a.pos != nullptr ? load_index(a.pos, a.pos_bits, t * a.s_pt + s * a.s_ps) : s);
    const bool valid = a.ids == nullptr || (id[r] >= 0 && id[r] < a.V);
    float o[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      o[e] = pe_value(pos, inv_freq_over_pi[e], (e & 1) ? 0.5 : 0.0);
      if (a.ids != nullptr)
        o[e] = valid ? embed_add(o[e], to_float(x[r].v[e]), a.has_scale, a.scale) : __int_as_float(0x7fc00000);
    }
    store16<T>(out + t * a.s_ot + s * a.s_os + j0, o);
  }
}

struct EmbedBwdArgs {
  const void* dout;  // atomic: (T, S, D) with strides s_ot, s_os, s_od; sorted: (N, D) rows s_on, s_od
  const void* ids;  // atomic: (T, S) ids; sorted: the sorted int64 ids (N,)
  const int64_t* order;  // sorted: token index of each sorted id
  void* dw;  // atomic: fp32 (V, D) contiguous, zeroed; sorted: (V, D) in the gradient dtype, row stride s_w0
  float* ws;  // sorted: fp32 (chunks, 2, D) partials of the runs crossing chunk edges
  int64_t N, S, D, V;
  int64_t s_ot, s_os, s_od, s_it, s_is, s_w0;
  float scale;
  int ids_bits;
  bool has_scale;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) embed_bwd_atomic_kernel(const EmbedBwdArgs a) {
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= a.D) return;
  const int64_t n_end = min_of<int64_t>(static_cast<int64_t>(blockIdx.x + 1) * kTokens, a.N);
  const T* dout = static_cast<const T*>(a.dout);
  float* dw = static_cast<float*>(a.dw);
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kTokens; n < n_end; ++n) {
    const int64_t t = n / a.S, s = n - t * a.S;
    const int64_t id = load_index(a.ids, a.ids_bits, t * a.s_it + s * a.s_is);
    if (id < 0 || id >= a.V) continue;
    float g = to_float(dout[t * a.s_ot + s * a.s_os + j * a.s_od]);
    if (a.has_scale) g *= a.scale;
    atomicAdd(dw + id * a.D + j, g);
  }
}

// p[e] += v[e] for e < 4, p 16-byte aligned, each element atomically (RED.E.ADD.F32): one 128-bit
// reduction (the float4 atomicAdd) on sm_90 and later, four 32-bit ones elsewhere and on the host.
__device__ __forceinline__ void atomic_add4(float* p, const float* v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
#else
#pragma unroll
  for (int e = 0; e < 4; ++e) atomicAdd(p + e, v[e]);
#endif
}

// Vector path of the atomic backward (dout rows 16-byte aligned with unit column stride, D a
// multiple of VEC = kMaxVec<T>, dw 16-byte aligned). Threads (bx, by) of block (blockIdx.x,
// blockIdx.y): columns [j0, j0 + VEC) with j0 = VEC * (blockIdx.y * bx + threadIdx.x); tokens n =
// (blockIdx.x * kTokensPerThread + r) * by + threadIdx.y for r < kTokensPerThread. All of a
// thread's ids and 16-byte dout loads are issued before any add.
template <typename T>
__global__ void __launch_bounds__(kThreads) embed_bwd_atomic_vec_kernel(const EmbedBwdArgs a) {
  constexpr int VEC = kMaxVec<T>;
  const int64_t j0 = VEC * (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x);
  if (j0 >= a.D) return;
  const T* dout = static_cast<const T*>(a.dout);
  int64_t id[kTokensPerThread], row[kTokensPerThread];
#pragma unroll
  for (int r = 0; r < kTokensPerThread; ++r) {
    const int64_t n = (static_cast<int64_t>(blockIdx.x) * kTokensPerThread + r) * blockDim.y + threadIdx.y;
    const int64_t t = n / a.S, s = n - t * a.S;
    id[r] = n < a.N ? load_index(a.ids, a.ids_bits, t * a.s_it + s * a.s_is) : -1;
    row[r] = t * a.s_ot + s * a.s_os;
  }
  Pack<T, VEC> x[kTokensPerThread];
#pragma unroll
  for (int r = 0; r < kTokensPerThread; ++r)
    if (id[r] >= 0 && id[r] < a.V) x[r] = *reinterpret_cast<const Pack<T, VEC>*>(dout + row[r] + j0);
#pragma unroll
  for (int r = 0; r < kTokensPerThread; ++r) {
    if (id[r] < 0 || id[r] >= a.V) continue;
    float g[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) g[e] = a.has_scale ? to_float(x[r].v[e]) * a.scale : to_float(x[r].v[e]);
    float* dw = static_cast<float*>(a.dw) + id[r] * a.D + j0;
#pragma unroll
    for (int e = 0; e < VEC; e += 4) atomic_add4(dw + e, g + e);
  }
}

// VEC elements of row p (columns j0 ..): one 16-byte access for VEC > 1, else one element at
// stride s_d.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_row(const T* p, int64_t j0, int64_t s_d) {
  if constexpr (VEC == 1)
    return Pack<T, 1>{{p[j0 * s_d]}};
  else
    return *reinterpret_cast<const Pack<T, VEC>*>(p + j0);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_row(T* p, const float (&x)[VEC]) {
  if constexpr (VEC == 1)
    p[0] = from_float<T>(x[0]);
  else
    store_float<T, VEC>(p, x);
}

// Segments of the sorted positions. Thread (threadIdx.x, threadIdx.y) of block (blockIdx.x,
// blockIdx.y): chunk k = blockIdx.x * blockDim.y + threadIdx.y, sorted indices [k * R, min(k * R + R,
// N)) with R = kChunkRows; columns [j0, j0 + VEC), j0 = VEC * (blockIdx.y * blockDim.x + threadIdx.x).
// Each run of equal valid ids v inside the chunk (a segment) is summed in order, s = sum of
// dout[order[i], j]; kChunkBatch rows are loaded before any is added. A segment that is a whole run:
// dw[v, j] = scale * s. Else s goes to ws[k, 0] when it continues a run from chunk k - 1, to
// ws[k, 1] when it only continues into chunk k + 1 (ws fp32 (chunks, 2, D)).
template <typename T, int VEC>
__device__ __forceinline__ void embed_bwd_segments(const EmbedBwdArgs& a) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t j0 = VEC * (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x);
  const int64_t start = k * kChunkRows;
  if (j0 >= a.D || start >= a.N) return;
  const int64_t end = min_of<int64_t>(start + kChunkRows, a.N);
  const int64_t* sorted = static_cast<const int64_t*>(a.ids);
  const T* dout = static_cast<const T*>(a.dout);
  const int64_t first = sorted[start], last = sorted[end - 1];
  const bool left = start > 0 && sorted[start - 1] == first;
  const bool right = end < a.N && sorted[end] == last;
  float acc[VEC] = {};
  for (int64_t i0 = start; i0 < end; i0 += kChunkBatch) {
    Pack<T, VEC> x[kChunkBatch];
#pragma unroll
    for (int b = 0; b < kChunkBatch; ++b)
      if (i0 + b < end) x[b] = load_row<T, VEC>(dout + a.order[i0 + b] * a.s_ot, j0, a.s_od);
#pragma unroll
    for (int b = 0; b < kChunkBatch; ++b) {
      const int64_t i = i0 + b;
      if (i >= end) break;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += to_float(x[b].v[e]);
      const int64_t v = sorted[i];
      if (i + 1 < end && sorted[i + 1] == v) continue;
      if (v >= 0 && v < a.V) {
        const bool cont = v == first && left;
        if (cont || (v == last && right)) {
          store_row<float, VEC>(a.ws + (2 * k + (cont ? 0 : 1)) * a.D + j0, acc);
        } else {
          float o[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[e] = a.has_scale ? acc[e] * a.scale : acc[e];
          store_row<T, VEC>(static_cast<T*>(a.dw) + v * a.s_w0 + j0, o);
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
    }
  }
}

// Runs crossing chunk edges. Thread as in embed_bwd_segments_kernel: if a run of a valid id v starts
// in chunk k0 and continues past it, dw[v, j] = scale * (ws[k0, 1] + sum of ws[k, 0] over the later
// chunks k the run reaches, in chunk order); its last chunk is found by binary search.
template <typename T, int VEC>
__device__ __forceinline__ void embed_bwd_crossing(const EmbedBwdArgs& a) {
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t j0 = VEC * (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x);
  const int64_t start = k0 * kChunkRows, end = start + kChunkRows;
  if (j0 >= a.D || end >= a.N) return;
  const int64_t* sorted = static_cast<const int64_t*>(a.ids);
  const int64_t v = sorted[end - 1];
  if (sorted[end] != v || (start > 0 && sorted[start - 1] == v) || v < 0 || v >= a.V) return;
  int64_t lo = end, hi = a.N;  // the run ends at the first index in [lo, hi) holding another id
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] == v)
      lo = mid + 1;
    else
      hi = mid;
  }
  const int64_t k_last = (lo - 1) / kChunkRows;
  float acc[VEC], x[VEC];
  load_float<float, VEC>(a.ws + (2 * k0 + 1) * a.D + j0, acc);
#pragma unroll 4
  for (int64_t k = k0 + 1; k <= k_last; ++k) {
    load_float<float, VEC>(a.ws + 2 * k * a.D + j0, x);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] += x[e];
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = a.has_scale ? acc[e] * a.scale : acc[e];
  store_row<T, VEC>(static_cast<T*>(a.dw) + v * a.s_w0 + j0, acc);
}

// The two passes as kernels: *_vec with 16-byte accesses (rows 16-byte aligned, unit column stride,
// D a multiple of kMaxVec<T>), the others one element a thread at any column stride.
template <typename T>
__global__ void __launch_bounds__(kThreads) embed_bwd_segments_vec_kernel(const EmbedBwdArgs a) {
  embed_bwd_segments<T, kMaxVec<T>>(a);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) embed_bwd_segments_kernel(const EmbedBwdArgs a) {
  embed_bwd_segments<T, 1>(a);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) embed_bwd_crossing_vec_kernel(const EmbedBwdArgs a) {
  embed_bwd_crossing<T, kMaxVec<T>>(a);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) embed_bwd_crossing_kernel(const EmbedBwdArgs a) {
  embed_bwd_crossing<T, 1>(a);
}

template <typename F>
int dispatch_embed_dtype(int dtype, F&& f) {
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

bool grid_ok(int64_t x, int64_t y) { return x <= INT32_MAX && y <= 65535; }

// A (rows, D) operand at p with row strides st0 (over n0 > 1 rows) and st1 (over n1 > 1), unit
// stride d: whether every row starts 16-byte aligned.
bool embed_rows_aligned(uintptr_t p, int64_t n0, int64_t st0, int64_t n1, int64_t st1, int64_t s_d, int es) {
  return aligned_to(p, 16) && s_d == 1 && (n0 <= 1 || (st0 * es) % 16 == 0) && (n1 <= 1 || (st1 * es) % 16 == 0);
}

int embed_next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < kThreads) p <<= 1;
  return p;
}

}  // namespace

int embed_sinusoidal_fwd(uintptr_t ids, int ids_bits, uintptr_t weight, uintptr_t positions, int pos_bits,
                         uintptr_t out, int64_t T, int64_t S, int64_t D, int64_t V, int64_t s_it, int64_t s_is,
                         int64_t s_w0, int64_t s_w1, int64_t s_pt, int64_t s_ps, int64_t s_ot, int64_t s_os,
                         int64_t s_od, int64_t offset, double scale, bool has_scale, double base, int dtype,
                         uintptr_t stream) {
  if (T < 0 || S < 0 || D < 0 || V < 0) return cudaErrorInvalidValue;
  const int64_t N = T * S;
  if (N == 0 || D == 0) return cudaSuccess;
  if (out == 0 || !(base > 0.0) || ((ids == 0) != (weight == 0))) return cudaErrorInvalidValue;
  if ((ids != 0 && ids_bits != 32 && ids_bits != 64) || (positions != 0 && pos_bits != 32 && pos_bits != 64))
    return cudaErrorInvalidValue;
  EmbedArgs a{};
  a.ids = reinterpret_cast<const void*>(ids);
  a.weight = reinterpret_cast<const void*>(weight);
  a.pos = reinterpret_cast<const void*>(positions);
  a.out = reinterpret_cast<void*>(out);
  a.N = N, a.S = S, a.D = D, a.V = V;
  a.s_it = s_it, a.s_is = s_is, a.s_w0 = s_w0, a.s_w1 = s_w1, a.s_pt = s_pt, a.s_ps = s_ps;
  a.s_ot = s_ot, a.s_os = s_os, a.s_od = s_od;
  a.offset = offset;
  a.scale = static_cast<float>(scale);
  a.log2_base = std::log2(base);
  a.ids_bits = ids_bits, a.pos_bits = pos_bits;
  a.has_scale = has_scale;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int es = dtype == kFloat32 ? 4 : 2;
  const int64_t vec = 16 / es;
  if (D % vec == 0 && embed_rows_aligned(out, T, s_ot, S, s_os, s_od, es) &&
      (weight == 0 || embed_rows_aligned(weight, V, s_w0, 1, 0, s_w1, es))) {
    const int bx = embed_next_pow2(D / vec), by = kThreads / bx;
    const int64_t gx = ceil_div<int64_t>(N, static_cast<int64_t>(by) * kTokensPerThread);
    const int64_t gy = ceil_div<int64_t>(D / vec, bx);
    if (!grid_ok(gx, gy)) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    return dispatch_embed_dtype(dtype, [&](auto tt) -> int {
      using TT = typename decltype(tt)::type;
      return launch(embed_sinusoidal_fwd_vec_kernel<TT>, grid, dim3(bx, by), st, a);
    });
  }
  const int64_t gx = ceil_div<int64_t>(N, kTokens), gy = ceil_div<int64_t>(D, kThreads);
  if (!grid_ok(gx, gy)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  return dispatch_embed_dtype(dtype, [&](auto tt) -> int {
    using TT = typename decltype(tt)::type;
    return launch(embed_sinusoidal_fwd_kernel<TT>, grid, dim3(kThreads), st, a);
  });
}

int embed_sinusoidal_bwd_atomic(uintptr_t dout, uintptr_t ids, int ids_bits, uintptr_t dweight_f32, int64_t T,
                                int64_t S, int64_t D, int64_t V, int64_t s_ot, int64_t s_os, int64_t s_od,
                                int64_t s_it, int64_t s_is, double scale, bool has_scale, int dtype,
                                uintptr_t stream) {
  if (T < 0 || S < 0 || D < 0 || V < 0) return cudaErrorInvalidValue;
  const int64_t N = T * S;
  if (N == 0 || D == 0 || V == 0) return cudaSuccess;
  if (dout == 0 || ids == 0 || dweight_f32 == 0 || (ids_bits != 32 && ids_bits != 64)) return cudaErrorInvalidValue;
  EmbedBwdArgs a{};
  a.dout = reinterpret_cast<const void*>(dout);
  a.ids = reinterpret_cast<const void*>(ids);
  a.dw = reinterpret_cast<void*>(dweight_f32);
  a.N = N, a.S = S, a.D = D, a.V = V;
  a.s_ot = s_ot, a.s_os = s_os, a.s_od = s_od, a.s_it = s_it, a.s_is = s_is;
  a.scale = static_cast<float>(scale);
  a.ids_bits = ids_bits;
  a.has_scale = has_scale;
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int es = dtype == kFloat32 ? 4 : 2;
  const int64_t vec = 16 / es;
  if (D % vec == 0 && aligned_to(dweight_f32, 16) && embed_rows_aligned(dout, T, s_ot, S, s_os, s_od, es)) {
    const int bx = embed_next_pow2(D / vec), by = kThreads / bx;
    const int64_t gx = ceil_div<int64_t>(N, static_cast<int64_t>(by) * kTokensPerThread);
    const int64_t gy = ceil_div<int64_t>(D / vec, bx);
    if (!grid_ok(gx, gy)) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    return dispatch_embed_dtype(dtype, [&](auto tt) -> int {
      using TT = typename decltype(tt)::type;
      return launch(embed_bwd_atomic_vec_kernel<TT>, grid, dim3(bx, by), st, a);
    });
  }
  const int64_t gx = ceil_div<int64_t>(N, kTokens), gy = ceil_div<int64_t>(D, kThreads);
  if (!grid_ok(gx, gy)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  return dispatch_embed_dtype(dtype, [&](auto tt) -> int {
    using TT = typename decltype(tt)::type;
    return launch(embed_bwd_atomic_kernel<TT>, grid, dim3(kThreads), st, a);
  });
}

int embed_bwd_chunk_rows() { return kChunkRows; }

int embed_sinusoidal_bwd_sorted(uintptr_t dout, uintptr_t sorted_ids, uintptr_t order, uintptr_t dweight,
                                uintptr_t workspace, int64_t N, int64_t D, int64_t V, int64_t s_on, int64_t s_od,
                                int64_t s_w0, double scale, bool has_scale, int dtype, uintptr_t stream) {
  if (N < 0 || D < 0 || V < 0) return cudaErrorInvalidValue;
  if (N == 0 || D == 0 || V == 0) return cudaSuccess;
  if (dout == 0 || sorted_ids == 0 || order == 0 || dweight == 0 || workspace == 0) return cudaErrorInvalidValue;
  EmbedBwdArgs a{};
  a.dout = reinterpret_cast<const void*>(dout);
  a.ids = reinterpret_cast<const void*>(sorted_ids);
  a.order = reinterpret_cast<const int64_t*>(order);
  a.dw = reinterpret_cast<void*>(dweight);
  a.ws = reinterpret_cast<float*>(workspace);
  a.N = N, a.S = 1, a.D = D, a.V = V;
  a.s_ot = s_on, a.s_od = s_od, a.s_w0 = s_w0;
  a.scale = static_cast<float>(scale);
  a.ids_bits = 64;
  a.has_scale = has_scale;
  const int es = dtype == kFloat32 ? 4 : 2;
  const int64_t vec = 16 / es;
  const bool vector = D % vec == 0 && aligned_to(workspace, 16) && embed_rows_aligned(dout, N, s_on, 1, 0, s_od, es) &&
                      embed_rows_aligned(dweight, V, s_w0, 1, 0, 1, es);
  const int64_t cols = vector ? D / vec : D, chunks = ceil_div<int64_t>(N, kChunkRows);
  const int bx = embed_next_pow2(cols), by = kThreads / bx;
  const int64_t gx = ceil_div<int64_t>(chunks, by), gy = ceil_div<int64_t>(cols, bx);
  if (!grid_ok(gx, gy)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), block(bx, by);
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_embed_dtype(dtype, [&](auto tt) -> int {
    using TT = typename decltype(tt)::type;
    const auto segments = vector ? embed_bwd_segments_vec_kernel<TT> : embed_bwd_segments_kernel<TT>;
    const auto crossing = vector ? embed_bwd_crossing_vec_kernel<TT> : embed_bwd_crossing_kernel<TT>;
    const int code = launch(segments, grid, block, st, a);
    return code != 0 || chunks == 1 ? code : launch(crossing, grid, block, st, a);
  });
}

}  // namespace fastlm
