// Token sampling (temperature, top-k, top-p, min-p) and the top-k/top-p filter, fp32/fp16/bf16.
//
// The definition is fastlm/reference/sampling.py; this computes it exactly as the Triton kernel
// does (the shared algorithm of both: fastlm/triton/sampling.py), with the same Philox4x32-10
// stream, so the same seed gives the same token wherever the fp32 exp2 of the backends agree.
// Per row b of x (B, V):
//   z = fp32(x) / T (T = 0: greedy, first index of max x), m = max z, e = exp2((z - m) log2 e),
//   mass = trunc(e 2^40) (int64: exact sums in any order), u = monotone uint32 of z;
//   tau_k = the k-th largest u (ties kept); S_k = sum_{u >= tau_k} mass;
//   tau_p = the largest t with sum_{u >= max(t, tau_k)} mass >= ceil(p S_k) (p < 1);
//   F = {u >= tau, e >= min_p}; S_F = sum_F mass;
//   token = first i in F whose running sum of mass exceeds min(floor(u53 2^-53 S_F), S_F - 1), u53
//   the 53-bit uniform from words 0, 1 of Philox(counter (0, b, offset), key seed);
//   logprob = (z_tok - m) - ln(S_F 2^-40).
// Row status (written as the token, or into the status buffer of the filter): 0 ok, -1 NaN/+inf,
// -2 all -inf, -3 bad temperature, -4 top_k < 1, -5 top_p outside (0, 1], -6 min_p outside [0, 1].
//
// Passes (one launch each, grid (rows B, slices NS); a slice is a run of whole 2048-element chunks):
//   STATS: max z, its first index, NaN/+inf per slice (+ the count histogram of D0 = u >> 21 with top-k);
//   COUNT level 1, 2: count histograms of D1 = (u >> 10) & 2047, D2 = u & 1023 under the prefix chosen;
//   MASS level 0, 1, 2: mass histograms of D0, D1, D2 of u >= tau_k under the prefix (top-p);
//   SUM: the F mass of every chunk; DRAW (one block per row): the chunk holding the target, reloaded;
//   or FILTER: x where in F, else -inf (NaN rows for status < 0).
// Each pass after STATS combines the slices' statistics of its row, then selects the digit of the
// previous histogram (SELECT: the largest bin b with sum_{b' >= b} h[b'] >= T, the target then
// T - sum_{b' > b} h[b']) and keeps it in a per-row state slot for the next pass. Histograms are
// counted with shared-memory atomics, then the non-zero bins added into the row's (integer sums:
// order-free, deterministic). Arithmetic that decides a token is written with explicit
// round-to-nearest intrinsics so nvcc cannot contract it into FMAs.

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int64_t kChunk = 2048;  // the lookup chunk of SUM and DRAW, and the slicing unit
constexpr int kItems = static_cast<int>(kChunk / kThreads);  // consecutive elements per thread in the draw
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMassScale = 1099511627776.0f;  // 2^40
constexpr int64_t kNone = INT64_MAX;

enum Pass : int { kStats = 0, kCount = 1, kMass = 2, kSum = 3, kFilter = 4 };
// Per-row state slots (2 int64 each: prefix or threshold, target), written by slice 0 of a pass.
enum Slot : int { kSlotK1 = 0, kSlotK2 = 1, kSlotTauK = 2, kSlotP1 = 3, kSlotP2 = 4, kSlotTau = 5, kSlots = 6 };

struct SamplingArgs {
  const void* x;
  int64_t stride_x, B, V;
  const float* temperature;  // (B,) fp32 or null (t_val)
  const int64_t* top_k;      // (B,) int64 or null (k_val)
  const float* top_p;        // (B,) fp32 or null (p_val)
  const float* min_p;        // (B,) fp32 or null (mp_val)
  float t_val, p_val, mp_val;
  int64_t k_val;
  const int64_t* seed;  // [seed, offset] (sampling)
  int64_t* tokens;      // (B,) token or status; the filter: status
  float* logprobs;      // (B,) or null
  void* out;            // (B, V) filtered logits (filter) or null (sampling)
  int64_t stride_o;
  int64_t* loads;       // (B,) logits elements loaded, or null
  int64_t* stats;       // (B, NS, 3): max z (fp32 bits), its first index, NaN/+inf flag
  int32_t* hist_k;      // (B, 3, kBins) count histograms (top-k) or null
  int64_t* hist_p;      // (B, 3, kBins) mass histograms (top-p) or null
  int64_t* state;       // (B, kSlots, 2)
  int64_t* chunk_sum;   // (B, n_chunks) (sampling)
  int64_t n_chunks;
  int ns, level;
  bool use_k, use_p, use_mp, sample;
};

__device__ __forceinline__ int32_t float_key(float z) {
  const int32_t b = __float_as_int(z);
  return b ^ ((b >> 31) & 0x7fffffff);
}

// key + 2^31: ordered like z, in [0, 2^32).
__device__ __forceinline__ uint32_t ukey(float z) { return static_cast<uint32_t>(float_key(z)) ^ 0x80000000u; }

__device__ __forceinline__ int64_t mass_of(float e) { return static_cast<int64_t>(__fmul_rn(e, kMassScale)); }

__device__ __forceinline__ float e_of(float z, float m) { return exp2f(__fmul_rn(__fsub_rn(z, m), kLog2e)); }

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduction over the block, returned to every thread. The ops used here (integer sums, min, max)
// are exact, so the order does not matter.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* smem) {
  v = warp_reduce(v, op);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
  return r;
}

struct Sum64 {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};
struct Min64 {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct Max64 {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? b : a; }
};
struct MaxF {
  __device__ float operator()(float a, float b) const { return a < b ? b : a; }
};

// Exclusive prefix sum of v over the block (thread order), and the block total.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t* smem, int64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t other = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += other;
  }
  __syncthreads();
  if (lane == 31) smem[warp] = incl;
  __syncthreads();
  int64_t before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += smem[w];
    all += smem[w];
  }
  *total = all;
  return before + incl - v;
}

// Calls f(i, x_i) for every i in [lo, hi) of the row, each thread in increasing i: 16-byte loads
// when the row is 16-byte aligned (lo a multiple of the vector width), a scalar tail.
template <typename T, typename F>
__device__ __forceinline__ void for_each(const T* row, int64_t lo, int64_t hi, bool vec, F&& f) {
  constexpr int N = kMaxVec<T>;
  int64_t i0 = lo;
  if (vec) {
    const int64_t nv = (hi - lo) / N;
    for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
      const int64_t i = lo + j * N;
      const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(row + i);
#pragma unroll
      for (int q = 0; q < N; ++q) f(i + q, to_float(pk.v[q]));
    }
    i0 = lo + nv * N;
  }
  for (int64_t i = i0 + threadIdx.x; i < hi; i += kThreads) f(i, to_float(row[i]));
}

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16 bytes of T from fp32 at p (16-byte aligned) as one 128-bit store, built as one unsigned
// __int128 (element 0 in the low bits): nvcc splits a Pack or float4 store here into narrower ones.
template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&v)[kMaxVec<T>]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      w[i] = __float_as_uint(v[i]);
    } else {
      w[i] = pack_float<T>(v[2 * i], v[2 * i + 1]);
    }
  }
  const uint64_t lo = (static_cast<uint64_t>(w[1]) << 32) | w[0], hi = (static_cast<uint64_t>(w[3]) << 32) | w[2];
  *reinterpret_cast<unsigned __int128*>(p) = (static_cast<unsigned __int128>(hi) << 64) | lo;
}

struct RowParams {
  float t_eff, p, mp;
  int64_t k, status;  // status: the parameter checks only
  bool greedy;
};

__device__ __forceinline__ RowParams row_params(const SamplingArgs& a, int64_t b) {
  const float T_ = a.temperature ? a.temperature[b] : a.t_val;
  RowParams r;
  r.k = a.top_k ? a.top_k[b] : a.k_val;
  r.p = a.top_p ? a.top_p[b] : a.p_val;
  r.mp = a.min_p ? a.min_p[b] : a.mp_val;
  r.greedy = T_ == 0.0f;
  const bool t_ok = T_ >= 0.0f && T_ <= FLT_MAX;
  r.t_eff = (r.greedy || !t_ok) ? 1.0f : T_;
  r.status = 0;
  if (!(r.mp >= 0.0f && r.mp <= 1.0f)) r.status = -6;
  if (!(r.p > 0.0f && r.p <= 1.0f)) r.status = -5;
  if (r.k < 1) r.status = -4;
  if (!t_ok) r.status = -3;
  return r;
}

__device__ __forceinline__ float z_of(float x, float t_eff) {
  const float v = __fdiv_rn(x, t_eff);
  return v == 0.0f ? 0.0f : v;  // -0.0 -> +0.0: one key per value
}

struct RowStats {
  float m;  // max z (0 when status != 0)
  int64_t am, status;
};

// The row's statistics from its NS slices, with the full status.
__device__ __forceinline__ RowStats row_stats(const SamplingArgs& a, int64_t b, const RowParams& rp) {
  const int64_t* s = a.stats + b * a.ns * 3;
  float m = -INFINITY;
  int64_t am = kNone, bad = 0;
  for (int i = 0; i < a.ns; ++i) {
    const float mi = __int_as_float(static_cast<int32_t>(s[3 * i]));
    const int64_t ai = s[3 * i + 1];
    if (mi > m || (mi == m && ai < am)) {
      m = mi;
      am = ai;
    }
    bad |= s[3 * i + 2];
  }
  RowStats r{m, am, rp.status};
  if (m == -INFINITY) r.status = -2;
  if (bad) r.status = -1;
  if (r.status != 0) r.m = 0.0f;
  return r;
}

struct Selected {
  int64_t bin, rest, total;
};

// SELECT(h, target) over the block: the largest bin b with G(b) = sum_{b' >= b} h[b'] >= target,
// rest = target - G(b + 1), and total = G(0). Every thread gets the result.
template <typename H>
__device__ Selected select_bin(const H* h, int64_t target, int64_t* smem) {
  __shared__ int64_t found[2];
  const int first = threadIdx.x * kBinsPerThread;
  int64_t v[kBinsPerThread], local = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    v[j] = h[first + j];
    local += v[j];
  }
  int64_t total;
  const int64_t excl = block_exclusive_scan(local, smem, &total);
  int64_t run = total - excl - local;  // the bins above this thread's
  if (threadIdx.x == 0) {
    found[0] = 0;
    found[1] = target;
  }
  __syncthreads();
#pragma unroll
  for (int j = kBinsPerThread - 1; j >= 0; --j) {
    run += v[j];
    if (run >= target && run - v[j] < target) {
      found[0] = first + j;
      found[1] = target - (run - v[j]);
    }
  }
  __syncthreads();
  const Selected r{found[0], found[1], total};
  __syncthreads();
  return r;
}

// Which thresholds the row computes: top-k (k < V) and top-p (p < 1).
struct Plan {
  bool row_k, row_p;
};

__device__ __forceinline__ int64_t* slot(const SamplingArgs& a, int64_t b, int s) { return a.state + (b * kSlots + s) * 2; }

// The one thread of a pass that writes the row's state slots.
__device__ __forceinline__ bool writer() { return blockIdx.y == 0 && threadIdx.x == 0; }

// tau_k from the count histograms (after COUNT level 2), 0 without top-k.
__device__ int64_t resolve_tau_k(const SamplingArgs& a, int64_t b, const Plan& pl, int64_t* smem) {
  if (!pl.row_k) return 0;
  const int64_t* s2 = slot(a, b, kSlotK2);
  const Selected sel = select_bin(a.hist_k + (b * 3 + 2) * kBins, s2[1], smem);
  return (s2[0] << 10) | sel.bin;
}

template <bool LOADS>
__device__ __forceinline__ void count_loads(const SamplingArgs& a, int64_t b, int64_t n) {
  if constexpr (LOADS) {
    if (threadIdx.x == 0 && n > 0) atomicAdd(reinterpret_cast<unsigned long long*>(a.loads + b), static_cast<unsigned long long>(n));
  }
}

// The streaming passes: grid (B, NS), kThreads threads. Launch bounds with 1 block an SM: without
// it ptxas aims at 48 registers for the 16-bit SUM pass and spills.
template <typename T, int PASS, bool LOADS>
__global__ void __launch_bounds__(kThreads, 1) sampling_kernel(SamplingArgs a) {
  __shared__ int64_t smem[kWarps];
  const int64_t b = blockIdx.x;
  const int s = static_cast<int>(blockIdx.y);
  const int64_t V = a.V;
  const int64_t c_lo = a.n_chunks * s / a.ns, c_hi = a.n_chunks * (s + 1) / a.ns;
  const int64_t lo = c_lo * kChunk, hi = min_of<int64_t>(c_hi * kChunk, V);
  const T* row = static_cast<const T*>(a.x) + b * a.stride_x;
  const bool vec = aligned16(row);
  const RowParams rp = row_params(a, b);
  const Plan pl{a.use_k && rp.k < V, a.use_p && rp.p < 1.0f};
  const float t_eff = rp.t_eff;

  if constexpr (PASS == kStats) {
    __shared__ int32_t hist[kBins];
    __shared__ float smem_f[kWarps];
    const bool do_hist = pl.row_k && rp.status == 0 && !(a.sample && rp.greedy);
    if (do_hist) {
      for (int j = threadIdx.x; j < kBins; j += kThreads) hist[j] = 0;
      __syncthreads();
    }
    float m = -INFINITY;
    int64_t am = kNone;
    int bad = 0;
    for_each(row, lo, hi, vec, [&](int64_t i, float x) {
      float z = z_of(x, t_eff);
      if (z != z || z == INFINITY) bad = 1;
      if (z != z) z = -INFINITY;
      if (z > m) {
        m = z;
        am = i;
      }
      if (do_hist) atomicAdd(&hist[ukey(z) >> 21], 1);
    });
    count_loads<LOADS>(a, b, hi - lo);
    const float row_m = block_reduce(m, MaxF{}, smem_f);
    am = block_reduce(m == row_m ? am : kNone, Min64{}, smem);
    const int64_t any_bad = block_reduce(static_cast<int64_t>(bad), Max64{}, smem);
    if (threadIdx.x == 0) {
      int64_t* st = a.stats + (b * a.ns + s) * 3;
      st[0] = static_cast<int64_t>(static_cast<uint32_t>(__float_as_int(row_m)));
      st[1] = am;
      st[2] = any_bad;
    }
    if (do_hist) {
      __syncthreads();
      int32_t* g = a.hist_k + b * 3 * kBins;
      for (int j = threadIdx.x; j < kBins; j += kThreads) {
        if (hist[j] != 0) atomicAdd(g + j, hist[j]);
      }
    }
    return;
  } else {
    const RowStats rs = row_stats(a, b, rp);
    const bool active = rs.status == 0 && !(a.sample && rp.greedy);
    const float m = rs.m;

    if constexpr (PASS == kCount || PASS == kMass) {
      const int level = a.level;
      if (!active || !(PASS == kCount ? pl.row_k : pl.row_p)) return;
      int64_t prefix = 0, tau_k = 0;
      if constexpr (PASS == kCount) {
        const int64_t* prev = level == 1 ? nullptr : slot(a, b, kSlotK1);
        const Selected sel = level == 1 ? select_bin(a.hist_k + b * 3 * kBins, rp.k, smem)
                                        : select_bin(a.hist_k + (b * 3 + 1) * kBins, prev[1], smem);
        prefix = level == 1 ? sel.bin : (prev[0] << 11) | sel.bin;
        if (writer()) {
          int64_t* w = slot(a, b, level == 1 ? kSlotK1 : kSlotK2);
          w[0] = prefix;
          w[1] = sel.rest;
        }
      } else {
        if (level == 0) {
          tau_k = resolve_tau_k(a, b, pl, smem);
          if (writer()) slot(a, b, kSlotTauK)[0] = tau_k;
        } else {
          tau_k = slot(a, b, kSlotTauK)[0];
          const int64_t* h = a.hist_p + (b * 3 + level - 1) * kBins;
          Selected sel;
          if (level == 1) {
            // the target from S_k = the total of the D0 mass histogram
            int64_t s_k = 0;
            for (int j = threadIdx.x; j < kBins; j += kThreads) s_k += h[j];
            s_k = block_reduce(s_k, Sum64{}, smem);
            const int64_t target = static_cast<int64_t>(ceil(__dmul_rn(static_cast<double>(rp.p), static_cast<double>(s_k))));
            sel = select_bin(h, target, smem);
            prefix = sel.bin;
          } else {
            const int64_t* prev = slot(a, b, kSlotP1);
            sel = select_bin(h, prev[1], smem);
            prefix = (prev[0] << 11) | sel.bin;
          }
          if (writer()) {
            int64_t* w = slot(a, b, level == 1 ? kSlotP1 : kSlotP2);
            w[0] = prefix;
            w[1] = sel.rest;
          }
        }
      }
      using H = typename std::conditional<PASS == kCount, int32_t, unsigned long long>::type;
      __shared__ H hist[kBins];
      for (int j = threadIdx.x; j < kBins; j += kThreads) hist[j] = 0;
      __syncthreads();
      const uint32_t tk = static_cast<uint32_t>(tau_k);
      const uint32_t pre = static_cast<uint32_t>(prefix);
      for_each(row, lo, hi, vec, [&](int64_t, float x) {
        const float z = z_of(x, t_eff);
        const uint32_t u = ukey(z);
        if constexpr (PASS == kCount) {
          if (level == 1 ? (u >> 21) == pre : (u >> 10) == pre) atomicAdd(&hist[level == 1 ? (u >> 10) & 2047 : u & 1023], 1);
        } else {
          const bool in = u >= tk && (level == 0 || (level == 1 ? (u >> 21) == pre : (u >> 10) == pre));
          if (in) {
            const int64_t w = mass_of(e_of(z, m));
            const uint32_t d = level == 0 ? u >> 21 : (level == 1 ? (u >> 10) & 2047 : u & 1023);
            if (w != 0) atomicAdd(&hist[d], static_cast<unsigned long long>(w));
          }
        }
      });
      count_loads<LOADS>(a, b, hi - lo);
      __syncthreads();
      for (int j = threadIdx.x; j < kBins; j += kThreads) {
        if (hist[j] == 0) continue;
        if constexpr (PASS == kCount) {
          atomicAdd(a.hist_k + (b * 3 + level) * kBins + j, hist[j]);
        } else {
          atomicAdd(reinterpret_cast<unsigned long long*>(a.hist_p + (b * 3 + level) * kBins + j), hist[j]);
        }
      }
      return;
    } else {
      // SUM or FILTER: the final threshold first
      int64_t tau = 0;
      if (active) {
        if (pl.row_p) {
          const int64_t* prev = slot(a, b, kSlotP2);
          const Selected sel = select_bin(a.hist_p + (b * 3 + 2) * kBins, prev[1], smem);
          tau = (prev[0] << 10) | sel.bin;
        } else {
          tau = resolve_tau_k(a, b, pl, smem);
        }
        if (writer()) slot(a, b, kSlotTau)[0] = tau;
      }
      const uint32_t tu = static_cast<uint32_t>(tau);
      const bool use_mp = a.use_mp;
      const float mp = rp.mp;
      auto in_support = [&](float z) { return ukey(z) >= tu && (!use_mp || e_of(z, m) >= mp); };
      if constexpr (PASS == kSum) {
        if (!active) return;
        for (int64_t c = c_lo; c < c_hi; ++c) {
          int64_t acc = 0;
          for_each(row, c * kChunk, min_of<int64_t>((c + 1) * kChunk, V), vec, [&](int64_t, float x) {
            const float z = z_of(x, t_eff);
            if (in_support(z)) acc += mass_of(e_of(z, m));
          });
          acc = block_reduce(acc, Sum64{}, smem);
          if (threadIdx.x == 0) a.chunk_sum[b * a.n_chunks + c] = acc;
        }
        count_loads<LOADS>(a, b, hi - lo);
      } else {
        T* out = static_cast<T*>(a.out) + b * a.stride_o;
        if (rs.status != 0) {
          for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) out[i] = from_float<T>(NAN);
        } else {
          constexpr int N = kMaxVec<T>;
          const T ninf = from_float<T>(-INFINITY);
          int64_t i0 = lo;
          if (vec && aligned16(out)) {
            const int64_t nv = (hi - lo) / N;
            for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
              const int64_t i = lo + j * N;
              float v[N];  // fp32 holds every fp16/bf16 value exactly: the stored x are x's own bits
              load_float<T, N>(row + i, v);
#pragma unroll
              for (int q = 0; q < N; ++q) v[q] = in_support(z_of(v[q], t_eff)) ? v[q] : -INFINITY;
              store16(out + i, v);
            }
            i0 = lo + nv * N;
          }
          for (int64_t i = i0 + threadIdx.x; i < hi; i += kThreads) {
            const T v = row[i];
            out[i] = in_support(z_of(to_float(v), t_eff)) ? v : ninf;
          }
          count_loads<LOADS>(a, b, hi - lo);
        }
        if (s == 0 && threadIdx.x == 0) a.tokens[b] = rs.status;
      }
    }
  }
}

// The draw: one block per row, after SUM.
template <typename T, bool LOADS>
__global__ void __launch_bounds__(kThreads) sampling_draw_kernel(SamplingArgs a) {
  __shared__ int64_t smem[kWarps];
  const int64_t b = blockIdx.x;
  const int64_t V = a.V;
  const RowParams rp = row_params(a, b);
  const RowStats rs = row_stats(a, b, rp);
  if (rs.status != 0 || rp.greedy) {
    if (threadIdx.x == 0) {
      a.tokens[b] = rs.status != 0 ? rs.status : rs.am;
      if (a.logprobs) a.logprobs[b] = rs.status != 0 ? NAN : 0.0f;
    }
    return;
  }
  const float m = rs.m;
  const int64_t* cs = a.chunk_sum + b * a.n_chunks;
  int64_t s_f = 0;
  for (int64_t c = threadIdx.x; c < a.n_chunks; c += kThreads) s_f += cs[c];
  s_f = block_reduce(s_f, Sum64{}, smem);
  const int64_t seed = a.seed[0], off = a.seed[1];
  uint32_t ctr[4] = {0u, static_cast<uint32_t>(b), static_cast<uint32_t>(off & 0xffffffff),
                     static_cast<uint32_t>((off >> 32) & 0xffffffff)};
  philox4x32(ctr, static_cast<uint32_t>(seed & 0xffffffff), static_cast<uint32_t>((seed >> 32) & 0xffffffff));
  const int64_t u53 = (static_cast<int64_t>(ctr[0] >> 11) << 32) | static_cast<int64_t>(ctr[1]);
  const double scaled = __dmul_rn(__dmul_rn(static_cast<double>(u53), 1.1102230246251565e-16), static_cast<double>(s_f));
  int64_t target = static_cast<int64_t>(floor(scaled));
  target = target < s_f - 1 ? target : s_f - 1;

  // the chunk c with sum_{<c} <= target < sum_{<=c}
  int64_t chunk = kNone, before = 0, run = 0;
  for (int64_t base = 0; base < a.n_chunks && chunk == kNone; base += kThreads) {
    const int64_t c = base + threadIdx.x;
    const int64_t v = c < a.n_chunks ? cs[c] : 0;
    int64_t total;
    const int64_t excl = run + block_exclusive_scan(v, smem, &total);
    const bool hit = excl <= target && target < excl + v;
    chunk = block_reduce(hit ? c : kNone, Min64{}, smem);
    before = block_reduce(hit ? excl : int64_t(0), Sum64{}, smem);
    run += total;
  }
  if (chunk == kNone) chunk = 0;

  // inverse CDF in index order within the chunk: kItems consecutive elements per thread
  const T* row = static_cast<const T*>(a.x) + b * a.stride_x;
  const int64_t lo = chunk * kChunk, hi = min_of<int64_t>(lo + kChunk, V);
  const int64_t first = lo + static_cast<int64_t>(threadIdx.x) * kItems;
  const uint32_t tu = static_cast<uint32_t>(slot(a, b, kSlotTau)[0]);
  const bool use_mp = a.use_mp;
  float z[kItems];
  if (aligned16(row) && first + kItems <= hi) {
    float xs[kItems];
    load_float<T, kItems>(row + first, xs);
#pragma unroll
    for (int j = 0; j < kItems; ++j) z[j] = z_of(xs[j], rp.t_eff);
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) z[j] = first + j < hi ? z_of(to_float(row[first + j]), rp.t_eff) : -INFINITY;
  }
  int64_t w[kItems], local = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    w[j] = 0;
    if (first + j < hi && ukey(z[j]) >= tu) {
      const float e = e_of(z[j], m);
      if (!use_mp || e >= rp.mp) w[j] = mass_of(e);
    }
    local += w[j];
  }
  count_loads<LOADS>(a, b, hi - lo);
  int64_t total;
  int64_t running = before + block_exclusive_scan(local, smem, &total);
  int64_t hit = kNone;
  float z_hit = 0.0f;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    running += w[j];
    if (hit == kNone && first + j < hi && running > target) {
      hit = first + j;
      z_hit = z[j];
    }
  }
  const int64_t token = block_reduce(hit, Min64{}, smem);
  if (token == kNone ? threadIdx.x == 0 : hit == token) {
    a.tokens[b] = token == kNone ? 0 : token;
    if (a.logprobs) {
      const double sf = static_cast<double>(s_f > 0 ? s_f : 1) * 9.094947017729282e-13;  // 2^-40
      const float lse = static_cast<float>(log(sf));
      const float zt = token == kNone ? z_of(to_float(row[0]), rp.t_eff) : z_hit;
      a.logprobs[b] = __fsub_rn(__fsub_rn(zt, m), lse);
    }
  }
}

template <typename T, bool LOADS>
int launch_passes(SamplingArgs a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>(a.ns)), block(kThreads);
  int err = launch(sampling_kernel<T, kStats, LOADS>, grid, block, stream, a);
  for (int level = 1; level <= 2 && a.use_k && err == cudaSuccess; ++level) {
    a.level = level;
    err = launch(sampling_kernel<T, kCount, LOADS>, grid, block, stream, a);
  }
  for (int level = 0; level <= 2 && a.use_p && err == cudaSuccess; ++level) {
    a.level = level;
    err = launch(sampling_kernel<T, kMass, LOADS>, grid, block, stream, a);
  }
  if (err != cudaSuccess) return err;
  if (!a.sample) return launch(sampling_kernel<T, kFilter, LOADS>, grid, block, stream, a);
  err = launch(sampling_kernel<T, kSum, LOADS>, grid, block, stream, a);
  if (err != cudaSuccess) return err;
  return launch(sampling_draw_kernel<T, LOADS>, dim3(static_cast<unsigned>(a.B)), block, stream, a);
}

template <typename T>
int launch_sampling(const SamplingArgs& a, cudaStream_t stream) {
  return dispatch_bool(a.loads != nullptr, [&](auto loads) { return launch_passes<T, decltype(loads)::value>(a, stream); });
}

}  // namespace

int sampling(uintptr_t logits, int64_t B, int64_t V, int64_t stride_x, int dtype, uintptr_t temperature,
             uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, double t_val, int64_t k_val, double p_val,
             double mp_val, bool use_k, bool use_p, bool use_mp, uintptr_t seed, uintptr_t tokens, uintptr_t logprobs,
             uintptr_t out, int64_t stride_o, uintptr_t loads, int64_t num_slices, uintptr_t stats, uintptr_t hist_k,
             uintptr_t hist_p, uintptr_t state, uintptr_t chunk_sum, uintptr_t stream) {
  const int64_t n_chunks = ceil_div<int64_t>(V, kChunk);
  if (B < 0 || V <= 0 || B > INT_MAX || V > (int64_t(1) << 22) || !logits || !tokens || (!out && (!seed || !chunk_sum)) ||
      num_slices < 1 || num_slices > n_chunks || num_slices > kMaxGridYZ || !stats || !state || (use_k && !hist_k) ||
      (use_p && !hist_p)) {
    return cudaErrorInvalidValue;
  }
  if (B == 0) return cudaSuccess;
  SamplingArgs a{};
  a.x = reinterpret_cast<const void*>(logits);
  a.stride_x = stride_x;
  a.B = B;
  a.V = V;
  a.temperature = reinterpret_cast<const float*>(temperature);
  a.top_k = reinterpret_cast<const int64_t*>(top_k);
  a.top_p = reinterpret_cast<const float*>(top_p);
  a.min_p = reinterpret_cast<const float*>(min_p);
  a.t_val = static_cast<float>(t_val);
  a.k_val = k_val;
  a.p_val = static_cast<float>(p_val);
  a.mp_val = static_cast<float>(mp_val);
  a.seed = reinterpret_cast<const int64_t*>(seed);
  a.tokens = reinterpret_cast<int64_t*>(tokens);
  a.logprobs = reinterpret_cast<float*>(logprobs);
  a.out = reinterpret_cast<void*>(out);
  a.stride_o = stride_o;
  a.loads = reinterpret_cast<int64_t*>(loads);
  a.stats = reinterpret_cast<int64_t*>(stats);
  a.hist_k = reinterpret_cast<int32_t*>(hist_k);
  a.hist_p = reinterpret_cast<int64_t*>(hist_p);
  a.state = reinterpret_cast<int64_t*>(state);
  a.chunk_sum = reinterpret_cast<int64_t*>(chunk_sum);
  a.n_chunks = n_chunks;
  a.ns = static_cast<int>(num_slices);
  a.use_k = use_k;
  a.use_p = use_p;
  a.use_mp = use_mp;
  a.sample = out == 0;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return launch_sampling<float>(a, s);
    case kFloat16:
      return launch_sampling<__half>(a, s);
    case kBFloat16:
      return launch_sampling<__nv_bfloat16>(a, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace fastlm
