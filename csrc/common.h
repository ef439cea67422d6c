// Shared helpers for the fastlm CUDA kernels: dtype codes and dispatch, fp16/bf16 conversion,
// vectorized loads and stores, warp and block sums, and the launch helper every launcher uses.
// Plain CUDA: no torch headers, so the extension never depends on the torch ABI.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(FASTLM_HOST_EMULATION)
#include "host/emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace fastlm {

// Dtype codes shared with fastlm/cuda/__init__.py (DTYPE_CODE).
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

template <typename T>
__host__ __device__ constexpr T min_of(T a, T b) {
  return a < b ? a : b;
}

template <typename T>
__host__ __device__ constexpr T max_of(T a, T b) {
  return a < b ? b : a;
}

inline bool aligned_to(uintptr_t p, uintptr_t bytes) { return p % bytes == 0; }

// Launch grid limits: x up to 2^31 - 1 blocks, y and z up to 65535. Launchers put products of
// batch and heads on x and split blockIdx.x in the kernel.
constexpr int64_t kMaxGridX = INT32_MAX;
constexpr int64_t kMaxGridYZ = 65535;

// a * b for a, b >= 0, or -1 when it exceeds limit (never overflows).
inline int64_t mul_within(int64_t a, int64_t b, int64_t limit) {
  if (a < 0 || b < 0 || (b != 0 && a > limit / b)) return -1;
  return a * b;
}

// Calls f(TypeTag<T>{}, TypeTag<W>{}) for the input dtype T and weight dtype W, where W is T or
// float. Returns f's result, or cudaErrorInvalidValue for an unsupported pair.
template <typename F>
int dispatch_input_weight(int x_dtype, int w_dtype, F&& f) {
  switch (x_dtype) {
    case kFloat32:
      if (w_dtype == kFloat32) return f(TypeTag<float>{}, TypeTag<float>{});
      break;
    case kFloat16:
      if (w_dtype == kFloat16) return f(TypeTag<__half>{}, TypeTag<__half>{});
      if (w_dtype == kFloat32) return f(TypeTag<__half>{}, TypeTag<float>{});
      break;
    case kBFloat16:
      if (w_dtype == kBFloat16) return f(TypeTag<__nv_bfloat16>{}, TypeTag<__nv_bfloat16>{});
      if (w_dtype == kFloat32) return f(TypeTag<__nv_bfloat16>{}, TypeTag<float>{});
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

// Calls f(std::integral_constant<bool, b>{}) so a runtime flag becomes a template argument.
template <typename F>
int dispatch_bool(bool b, F&& f) {
  if (b) return f(std::true_type{});
  return f(std::false_type{});
}

// Conversions: fp32 arithmetic everywhere, round-to-nearest-even on the way out (as torch does).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T moved as one aligned access (N * sizeof(T) <= 16 bytes: one 128-bit load at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Largest element count of T that fits one 16-byte access.
template <typename T>
constexpr int kMaxVec = static_cast<int>(16 / sizeof(T));

// Reads VEC elements at p into fp32. p must be aligned to min(16, VEC * sizeof(T)) bytes; wider
// reads (fp32 weights beside 8-wide fp16 inputs) are split into 16-byte pieces.
template <typename T, int VEC>
__device__ __forceinline__ void load_float(const T* p, float (&out)[VEC]) {
  constexpr int P = VEC < kMaxVec<T> ? VEC : kMaxVec<T>;
#pragma unroll
  for (int i = 0; i < VEC; i += P) {
    const Pack<T, P> pk = *reinterpret_cast<const Pack<T, P>*>(p + i);
#pragma unroll
    for (int j = 0; j < P; ++j) out[i + j] = to_float(pk.v[j]);
  }
}

// Writes VEC fp32 values to p as T, with the alignment rule of load_float.
template <typename T, int VEC>
__device__ __forceinline__ void store_float(T* p, const float (&in)[VEC]) {
  constexpr int P = VEC < kMaxVec<T> ? VEC : kMaxVec<T>;
#pragma unroll
  for (int i = 0; i < VEC; i += P) {
    Pack<T, P> pk;
#pragma unroll
    for (int j = 0; j < P; ++j) pk.v[j] = from_float<T>(in[i + j]);
    *reinterpret_cast<Pack<T, P>*>(p + i) = pk;
  }
}

// Sum over the 32 lanes of a full warp, returned to every lane. The xor butterfly applies the same
// tree on every lane and fp32 addition is commutative, so all lanes get bit-identical results.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Maximum over the 32 lanes of a full warp, returned to every lane.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum of v over a 1-D block of any size (the last warp may be partial), returned to every thread
// in a fixed order, so the result is deterministic. smem holds at least 32 floats; it may be
// reused as soon as this returns.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  const int lanes = min_of<int>(32, blockDim.x - warp * 32);
  const unsigned mask = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_down_sync(mask, v, o);
    if (lane + o < lanes) v += other;
  }
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < nwarps; ++w) total += smem[w];
  __syncthreads();
  return total;
}

// The SM count of the current device (a launch plan input), or the CUDA error.
inline cudaError_t current_sm_count(int* sms) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
}

// Launches kernel<<<grid, block, 0, stream>>>(args...) and returns cudaGetLastError(). In the host
// build (FASTLM_HOST_EMULATION, csrc/host/) the emulated device runs it instead.
template <typename... KArgs, typename... Args>
inline cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t stream,
                          Args... args) {
#if defined(FASTLM_HOST_EMULATION)
  (void)stream;
  return emulation::launch(kernel, grid, block, static_cast<KArgs>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(static_cast<KArgs>(args)...);
  return cudaGetLastError();
#endif
}

// Launch with dynamic shared memory (raising the 48 KiB default when needed).
template <typename... KArgs, typename... Args>
inline cudaError_t launch_smem(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               Args... args) {
#if defined(FASTLM_HOST_EMULATION)
  (void)stream;
  return emulation::launch_smem(kernel, grid, block, smem, static_cast<KArgs>(args)...);
#else
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, smem, stream>>>(static_cast<KArgs>(args)...);
  return cudaGetLastError();
#endif
}

// The dynamic shared memory of the running block.
#if defined(FASTLM_HOST_EMULATION)
#define FASTLM_DYN_SMEM(name) unsigned char* name = ::fastlm::emulation::dynamic_smem()
#else
#define FASTLM_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---- PTX wrappers: a device body (inline asm) and a host body with the PTX ISA's semantics ----

// 2^x by ex2.approx.ftz.f32 (one MUFU.EX2; exp2f adds a range test and two multiplies to keep
// subnormal results): subnormal inputs and results are flushed to zero, 2^-inf = 0. The host body
// rounds correctly where the GPU's is within 2 ulp (PTX ISA, "ex2").
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(FASTLM_HOST_EMULATION)
  const float r = std::exp2(x);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.f : r;
#elif defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
#else
  return exp2f(x);
#endif
}

// d += a (16x16, row-major) * b (16x8, column-major): mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32
// for T = fp16 or bf16, one warp. Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"), g = lane / 4, c = lane % 4, the lower column / k index in the low 16 bits:
//   a[0] = A(g, 2c..2c+1), a[1] = A(g+8, 2c..), a[2] = A(g, 2c+8..), a[3] = A(g+8, 2c+8..)
//   b0 = B(k 2c..2c+1, n g), b1 = B(k 2c+8..2c+9, n g)
//   d[0], d[1] = D(g, 2c..2c+1), d[2], d[3] = D(g+8, 2c..2c+1)
// The host body sums the 16 exact products and d in fp64 and rounds once (the tensor core's own
// accumulation order and truncation differ from it in the last bits).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "mma_m16n8k16: fp16 or bf16");
#if defined(FASTLM_HOST_EMULATION)
  emulation::mma_m16n8k16_sync(std::is_same<T, __half>::value ? kFloat16 : kBFloat16, d, a, b0, b1, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

// r[i] = this lane's part of 8x8 b16 matrix i (i < NUM): ldmatrix.sync.aligned.m8n8.x{NUM}[.trans]
// .shared.b16, one warp (sm_75+). Lane 8i + j gives the 16-byte aligned shared address of row j of
// matrix i (lanes from 8 NUM on are not read). Without .trans lane l gets row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 (the lower column in the low 16 bits); with .trans, column l / 4,
// rows 2 (l % 4) and 2 (l % 4) + 1: the B operand of mma from a row-major [k][n] tile.
template <int NUM, bool TRANS>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[NUM], const void* row) {
  static_assert(NUM == 1 || NUM == 2 || NUM == 4, "ldmatrix: .x1, .x2 or .x4");
#if defined(FASTLM_HOST_EMULATION)
  emulation::ldmatrix_sync(NUM, TRANS, r, row, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (NUM == 1 && !TRANS) asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  if constexpr (NUM == 1 && TRANS) asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  if constexpr (NUM == 2 && !TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (NUM == 2 && TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (NUM == 4 && !TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  if constexpr (NUM == 4 && TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#else
  __trap();
#endif
}

// 16 bytes from global src to shared dst (both 16-byte aligned) without waiting: cp.async.cg
// .shared.global (sm_80+); with src_bytes < 16 only that many are read and the rest of dst is zeroed.
// The copy belongs to the group the next cp_async_commit closes; cp_async_wait<N> returns when at
// most the N most recent groups of this thread are in flight (its copies are then visible to this
// thread; to the others after a barrier).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes = 16) {
#if defined(FASTLM_HOST_EMULATION)
  emulation::cp_async(dst, src, src_bytes, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(FASTLM_HOST_EMULATION)
  emulation::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FASTLM_HOST_EMULATION)
  emulation::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- random numbers (csrc/sampling.cu, attention dropout) ----

// Philox4x32-10 (Salmon et al. 2011), the Random123 round and key schedule: c becomes the 4 words
// of counter c under key (k0, k1).
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

// Attention dropout (fastlm/reference/attention.py, "Options"): whether entry (packed query row ig,
// packed key row jg, query head h) is kept, and the same for key jg + 1 in *keep_next:
//     keep = word_{jg & 3} of Philox4x32-10(counter (jg >> 2, ig, h, offset), key (seed_lo, seed_hi)) >= threshold
// (threshold = floor(p 2^32)). One Philox call serves both keys unless jg & 3 == 3.
__device__ __forceinline__ bool dropout_keep_pair(uint32_t ig, uint32_t jg, uint32_t h, uint32_t offset, uint32_t seed_lo,
                                                  uint32_t seed_hi, uint32_t threshold, bool* keep_next) {
  uint32_t w[4] = {jg >> 2, ig, h, offset};
  philox4x32(w, seed_lo, seed_hi);
  const uint32_t sel = jg & 3;
  const uint32_t first = sel == 0 ? w[0] : sel == 1 ? w[1] : sel == 2 ? w[2] : w[3];
  uint32_t second = sel == 0 ? w[1] : sel == 1 ? w[2] : w[3];
  if (sel == 3) {
    uint32_t n[4] = {(jg >> 2) + 1, ig, h, offset};
    philox4x32(n, seed_lo, seed_hi);
    second = n[0];
  }
  *keep_next = second >= threshold;
  return first >= threshold;
}

// ---- attention (csrc/attention.cu, csrc/decode_attention.cu) ----

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

// Maximum and sum over the 4 lanes of a quad (the lanes holding one row of an mma C fragment).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

constexpr float kNegInf = -INFINITY;
constexpr float kLn2 = 0.6931471805599453f;

inline dim3 to_dim3(const std::array<int64_t, 3>& g) {
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


// The 14 element strides of an attention launcher (q, k, v, out as (b, h, s); lse as (b, h)) into
// a parameter struct with members sq, sk, sv, so [3] and sl [2].
template <typename P>
inline void set_attention_strides(P& p, const std::vector<int64_t>& strides) {
  for (int i = 0; i < 3; ++i) {
    p.sq[i] = strides[i];
    p.sk[i] = strides[3 + i];
    p.sv[i] = strides[6 + i];
    p.so[i] = strides[9 + i];
  }
  p.sl[0] = strides[12];
  p.sl[1] = strides[13];
}

// Split-KV partials (csrc/attention.cu, csrc/decode_attention.cu): o_part (splits, rows, D), l_part
// (splits, rows); row = (b * Hq + h) * Sq + t.
struct CombineParams {
  const float* o_part;
  const float* l_part;
  void* o;
  float* lse;
  int64_t so[3], sl[2];
  int Hq, Sq, splits;
  int64_t rows;
};

// The combine's view of a split launcher's parameters (o_part, l_part, o, lse, so, sl, Hq, Sq, splits).
template <typename P>
inline CombineParams combine_params(const P& p, int64_t rows) {
  CombineParams cp{};
  cp.o_part = p.o_part;
  cp.l_part = p.l_part;
  cp.o = p.o;
  cp.lse = p.lse;
  for (int i = 0; i < 3; ++i) cp.so[i] = p.so[i];
  cp.sl[0] = p.sl[0];
  cp.sl[1] = p.sl[1];
  cp.Hq = p.Hq;
  cp.Sq = p.Sq;
  cp.splits = p.splits;
  cp.rows = rows;
  return cp;
}

// Merges the split partials of row (b, h, t) = `row` (fp32 O normalised per split, log2-domain LSE;
// -inf for a split that saw no key) in split order; one warp, lane `lane`:
//     M = max_s L_s,  O = sum_s 2^(L_s - M) O_s / sum_s 2^(L_s - M),  LSE = (M + log2 sum_s 2^(L_s - M)) ln 2
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

}  // namespace fastlm
