// Token sampling (temperature, top-k, top-p, min-p) and the top-k/top-p filter, fp32/fp16/bf16.
//
// The definition is fastlm/reference/sampling.py; this computes it exactly as the Triton kernel
// does, with the same Philox4x32-10 stream, so the same seed gives the same token wherever the
// fp32 exp2 of the backends agree. Per row b of x (B, V):
//   z = fp32(x) / T (T = 0: greedy, first index of max x), m = max z, e = exp2((z - m) log2 e),
//   mass = trunc(e 2^40) (int64: exact sums in any order), key = monotone int32 of z;
//   tau_k = the k-th largest key (ties kept); S_k = sum_{key >= tau_k} mass;
//   tau_p = the largest key t >= tau_k with sum_{key >= t} mass >= ceil(p S_k) (p < 1);
//   F = {key >= tau_p, e >= min_p}; S_F = sum_F mass;
//   token = first i in F whose running sum of mass exceeds min(floor(u S_F), S_F - 1), u the
//   53-bit uniform from words 0, 1 of Philox(counter (0, b, offset), key seed);
//   logprob = (z_tok - m) - ln(S_F 2^-40).
// Row status (written as the token, or into the status buffer of the filter): 0 ok, -1 NaN/+inf,
// -2 all -inf, -3 bad temperature, -4 top_k < 1, -5 top_p outside (0, 1], -6 min_p outside [0, 1].
//
// Trade-off: one block per row, no sort and no scratch memory. The thresholds are exact searches
// on the key: each pass counts (top-k) or sums the masses (top-p) of the elements at or above
// kPiv pivots spread over the open key interval and shrinks it (kPiv + 1)-fold, so kPasses
// passes close any 32-bit interval (fewer when it closes early); a row is read 3 + 2 kPasses
// times in the worst case, from L2 for the batch sizes of decoding. Arithmetic that decides a
// token is written with explicit round-to-nearest intrinsics so nvcc cannot contract it into FMAs.

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cmath>

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPiv = 8;
constexpr int kPasses = 11;  // the least n with (kPiv + 1)^n >= 2^32
constexpr int kItems = 4;    // consecutive elements per thread in the sampling scan
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMassScale = 1099511627776.0f;  // 2^40
constexpr int64_t kNone = INT64_MAX;

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
  bool use_k, use_p, use_mp;
};

__device__ __forceinline__ int32_t float_key(float z) {
  const int32_t b = __float_as_int(z);
  return b ^ ((b >> 31) & 0x7fffffff);
}

__device__ __forceinline__ int64_t mass_of(float e) { return static_cast<int64_t>(__fmul_rn(e, kMassScale)); }

// Philox4x32-10 (Salmon et al. 2011), the Random123 round and key schedule.
__device__ __forceinline__ void philox4x32(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduction over the block (blockDim.x == kThreads), returned to every thread. The ops used here
// (integer sums, min, max) are exact, so the order does not matter.
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

// Exclusive prefix sum of v over the block, and the block total.
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

template <typename T>
struct Row {
  const T* x;
  float t_eff;
  __device__ __forceinline__ float z(int64_t i) const {
    const float v = __fdiv_rn(to_float(x[i]), t_eff);
    return v == 0.0f ? 0.0f : v;  // -0.0 -> +0.0: one key per value
  }
};

__device__ __forceinline__ float e_of(float z, float m) { return exp2f(__fmul_rn(__fsub_rn(z, m), kLog2e)); }

// The largest key t in [lo, hi) with W(t) >= target, W(t) the count (or, weighted, the mass) of
// the row's elements with key >= t; needs W(lo) >= target > W(hi).
template <typename T, bool WEIGHTED>
__device__ int64_t search(const Row<T>& row, int64_t V, float m, int64_t lo, int64_t hi, int64_t target,
                          int64_t* smem) {
  for (int pass = 0; pass < kPasses && hi - lo > 1; ++pass) {
    int64_t piv[kPiv], acc[kPiv];
    const int64_t W = hi - lo;
#pragma unroll
    for (int j = 0; j < kPiv; ++j) {
      piv[j] = lo + (W * (j + 1)) / (kPiv + 1);
      acc[j] = 0;
    }
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float z = row.z(i);
      const int64_t key = float_key(z);
      const int64_t w = WEIGHTED ? mass_of(e_of(z, m)) : 1;
#pragma unroll
      for (int j = 0; j < kPiv; ++j) acc[j] += key >= piv[j] ? w : 0;
    }
    int64_t new_lo = lo, new_hi = hi;
#pragma unroll
    for (int j = 0; j < kPiv; ++j) {
      const int64_t total = block_reduce(acc[j], Sum64{}, smem);
      if (total >= target) {
        new_lo = piv[j] > new_lo ? piv[j] : new_lo;
      } else {
        new_hi = piv[j] < new_hi ? piv[j] : new_hi;
      }
    }
    lo = new_lo;
    hi = new_hi;
  }
  return lo;
}

template <typename T, bool SAMPLE>
__global__ void __launch_bounds__(kThreads) sampling_kernel(SamplingArgs a) {
  __shared__ int64_t smem[kWarps];
  __shared__ float smem_f[kWarps];
  const int64_t b = blockIdx.x;
  const int64_t V = a.V;
  const float T_ = a.temperature ? a.temperature[b] : a.t_val;
  const int64_t k = a.top_k ? a.top_k[b] : a.k_val;
  const float p = a.top_p ? a.top_p[b] : a.p_val;
  const float mp = a.min_p ? a.min_p[b] : a.mp_val;
  const bool greedy = T_ == 0.0f;
  const bool t_ok = T_ >= 0.0f && T_ <= FLT_MAX;
  const Row<T> row{static_cast<const T*>(a.x) + b * a.stride_x, (greedy || !t_ok) ? 1.0f : T_};

  // pass A: max (first index), smallest key, NaN/+inf
  float m = -INFINITY;
  int64_t am = kNone, kmin = INT_MAX, bad = 0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    float z = row.z(i);
    if (z != z || z == INFINITY) bad = 1;
    if (z != z) z = -INFINITY;
    if (z > m) {
      m = z;
      am = i;
    }
    const int64_t key = float_key(z);
    kmin = key < kmin ? key : kmin;
  }
  const float row_max = block_reduce(m, [](float x, float y) { return x < y ? y : x; }, smem_f);
  am = block_reduce(m == row_max ? am : kNone, Min64{}, smem);
  kmin = block_reduce(kmin, Min64{}, smem);
  bad = block_reduce(bad, Max64{}, smem);
  m = row_max;

  int64_t status = 0;
  if (!(mp >= 0.0f && mp <= 1.0f)) status = -6;
  if (!(p > 0.0f && p <= 1.0f)) status = -5;
  if (k < 1) status = -4;
  if (!t_ok) status = -3;
  if (m == -INFINITY) status = -2;
  if (bad) status = -1;
  const bool active = status == 0 && !(SAMPLE && greedy);
  if (status != 0) m = 0.0f;
  const int64_t kmax = float_key(m);

  int64_t tau = kmin;
  if (active && a.use_k && k < V) tau = search<T, false>(row, V, m, kmin, kmax + 1, k, smem);
  if (active && a.use_p && p < 1.0f) {
    int64_t s_k = 0;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float z = row.z(i);
      if (float_key(z) >= tau) s_k += mass_of(e_of(z, m));
    }
    s_k = block_reduce(s_k, Sum64{}, smem);
    const int64_t target = static_cast<int64_t>(ceil(__dmul_rn(static_cast<double>(p), static_cast<double>(s_k))));
    tau = search<T, true>(row, V, m, tau, kmax + 1, target, smem);
  }
  const bool use_mp = a.use_mp;
  auto in_support = [&](float z) { return float_key(z) >= tau && (!use_mp || e_of(z, m) >= mp); };

  if (!SAMPLE) {
    T* out = static_cast<T*>(a.out) + b * a.stride_o;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const T v = row.x[i];
      out[i] = status != 0 ? from_float<T>(NAN) : (in_support(row.z(i)) ? v : from_float<T>(-INFINITY));
    }
    if (threadIdx.x == 0) a.tokens[b] = status;
    return;
  }

  int64_t token = am, s_f = 0;
  if (active) {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const float z = row.z(i);
      if (in_support(z)) s_f += mass_of(e_of(z, m));
    }
    s_f = block_reduce(s_f, Sum64{}, smem);
    const int64_t seed = a.seed[0], off = a.seed[1];
    uint32_t c[4] = {0u, static_cast<uint32_t>(b), static_cast<uint32_t>(off & 0xffffffff),
                     static_cast<uint32_t>((off >> 32) & 0xffffffff)};
    philox4x32(c, static_cast<uint32_t>(seed & 0xffffffff), static_cast<uint32_t>((seed >> 32) & 0xffffffff));
    const int64_t u53 = (static_cast<int64_t>(c[0] >> 11) << 32) | static_cast<int64_t>(c[1]);
    const double scaled = __dmul_rn(__dmul_rn(static_cast<double>(u53), 1.1102230246251565e-16), static_cast<double>(s_f));
    int64_t target = static_cast<int64_t>(floor(scaled));
    target = target < s_f - 1 ? target : s_f - 1;
    // inverse CDF in index order: kItems consecutive elements per thread, a block scan per chunk
    int64_t run = 0;
    token = kNone;
    for (int64_t base = 0; base < V; base += static_cast<int64_t>(kThreads) * kItems) {
      const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kItems;
      int64_t w[kItems], local = 0;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        w[j] = 0;
        if (first + j < V) {
          const float z = row.z(first + j);
          if (in_support(z)) w[j] = mass_of(e_of(z, m));
        }
        local += w[j];
      }
      int64_t total;
      int64_t running = run + block_exclusive_scan(local, smem, &total);
      int64_t hit = kNone;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        running += w[j];
        if (hit == kNone && first + j < V && running > target) hit = first + j;
      }
      hit = block_reduce(hit, Min64{}, smem);
      if (hit != kNone) {
        token = hit;
        break;
      }
      run += total;
    }
    if (token == kNone) token = 0;
  }
  if (threadIdx.x == 0) {
    a.tokens[b] = status != 0 ? status : token;
    if (a.logprobs) {
      float lp = NAN;
      if (status == 0) {
        if (greedy) {
          lp = 0.0f;
        } else {
          const double sf = static_cast<double>(s_f > 0 ? s_f : 1) * 9.094947017729282e-13;  // 2^-40
          const float lse = static_cast<float>(log(sf));
          lp = __fsub_rn(__fsub_rn(row.z(token), m), lse);
        }
      }
      a.logprobs[b] = lp;
    }
  }
}

template <typename T>
int launch_sampling(const SamplingArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.B)), block(kThreads);
  if (a.out) return launch(sampling_kernel<T, false>, grid, block, stream, a);
  return launch(sampling_kernel<T, true>, grid, block, stream, a);
}

}  // namespace

int sampling(uintptr_t logits, int64_t B, int64_t V, int64_t stride_x, int dtype, uintptr_t temperature,
             uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, double t_val, int64_t k_val, double p_val,
             double mp_val, bool use_k, bool use_p, bool use_mp, uintptr_t seed, uintptr_t tokens, uintptr_t logprobs,
             uintptr_t out, int64_t stride_o, uintptr_t stream) {
  if (B < 0 || V <= 0 || B > INT_MAX || V > (int64_t(1) << 22) || !logits || !tokens || (!out && !seed)) {
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
  a.use_k = use_k;
  a.use_p = use_p;
  a.use_mp = use_mp;
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
