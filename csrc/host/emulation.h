// The CUDA execution model for the host compiler: what csrc/common.h includes instead of the CUDA
// headers when FASTLM_HOST_EMULATION is defined, so the unchanged kernels build into fastlm._C_host.
//
// A launch runs its blocks one after another (in a seeded order); a block's threads are fibers that
// switch only at __syncthreads and warp operations, picked in a seeded order each time. Warp
// operations (shuffles, votes, __syncwarp, mma.sync) complete when every lane of their mask has
// arrived. Every memory access of a kernel goes through the __asan_{load,store}*_noabort hooks
// (the kernels are compiled with -fsanitize=kernel-address in outline mode; runtime.cpp implements
// the hooks), which check global accesses against the extents Python registered and shared
// accesses for bounds, races between barriers and reads of bytes never written in the block.
// Trade-off: one OS thread, one block at a time: slow (microseconds a fiber switch) but exact about
// the ordering the CUDA model promises, and schedules vary with the seed.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// Function-local statics: one instance, used by one block at a time. runtime.cpp finds them in the
// module's symbol table (all function-local statics of namespace fastlm are __shared__ variables).
#define __shared__ static

// ---- runtime API types -----------------------------------------------------------------------

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct __align__(8) float2 {
  float x, y;
};
struct __align__(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

const char* cudaGetErrorString(cudaError_t code);
cudaError_t cudaGetLastError();
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);

// ---- fp16 / bf16: storage types with the GPU's conversions (round to nearest even) -------------

struct __align__(2) __half {
  uint16_t __x;
};
struct __align__(2) __nv_bfloat16 {
  uint16_t __x;
};

namespace fastlm {
namespace emulation {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace emulation
}  // namespace fastlm

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu;
  const uint32_t man = h.__x & 0x3ffu;
  if (exp == 0) {
    const float mag = static_cast<float>(man) * 0x1p-24f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return fastlm::emulation::bits_float(sign | 0x7f800000u | (man << 13));
  return fastlm::emulation::bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

// NaN gives 0x7fff as on the GPU; |f| >= 65520 rounds to infinity; below 2^-14 to a subnormal.
inline __half __float2half_rn(float f) {
  const uint32_t x = fastlm::emulation::float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return {0x7fff};
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};
  if (a < 0x38800000u) {
    const float r = std::nearbyint(fastlm::emulation::bits_float(a) * 0x1p24f);
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(r))};
  }
  const uint32_t r = a - 0x38000000u;
  return {static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 h) { return fastlm::emulation::bits_float(static_cast<uint32_t>(h.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = fastlm::emulation::float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {0x7fff};
  return {static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

// ---- math intrinsics -------------------------------------------------------------------------
// IEEE single and double operations (the host build uses -ffp-contract=off, so nothing fuses).

inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float __int_as_float(int v) { return fastlm::emulation::bits_float(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(fastlm::emulation::float_bits(v)); }
inline float __uint_as_float(unsigned v) { return fastlm::emulation::bits_float(v); }
inline unsigned __float_as_uint(float v) { return fastlm::emulation::float_bits(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }

// sin(pi x) and cos(pi x): x reduced exactly to r in [-1/2, 1/2] plus a quadrant, then fp64
// sin / cos of pi r rounded to float (the GPU's sincospif is within 1 ulp of the same value).
inline void sincospif(float x, float* s, float* c) {
  if (!std::isfinite(x)) {
    *s = *c = NAN;
    return;
  }
  const double d = static_cast<double>(x);
  const double n = std::nearbyint(2.0 * d);
  const double r = d - 0.5 * n;
  constexpr double kPi = 3.141592653589793238462643383279502884;
  const double sr = std::sin(kPi * r), cr = std::cos(kPi * r);
  const int q = static_cast<int>(std::fmod(n, 4.0) + 4.0) & 3;
  const double sv = q == 0 ? sr : q == 1 ? cr : q == 2 ? -sr : -cr;
  const double cv = q == 0 ? cr : q == 1 ? -sr : q == 2 ? -cr : sr;
  *s = static_cast<float>(sv == 0.0 ? (std::signbit(x) ? -0.0 : 0.0) : sv);
  *c = static_cast<float>(cv);
}
inline float sinpif(float x) {
  float s, c;
  sincospif(x, &s, &c);
  return s;
}
inline float cospif(float x) {
  float s, c;
  sincospif(x, &s, &c);
  return c;
}

// ---- the emulated device ---------------------------------------------------------------------

namespace fastlm {
namespace emulation {

// The running fiber's coordinates; the scheduler rewrites them at every switch.
struct ThreadCoords {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
extern ThreadCoords g_coords;

// Warp collectives (one entry point: op, the lanes that take part, this lane's 64-bit operand).
enum class WarpOp : int { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSync, kMma, kLdmatrix };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
void syncthreads(const char* file, int line);
[[noreturn]] void trap(const char* file, int line);

// d += A (16x16) B (16x8) for one warp; dtype 1 = fp16, 2 = bf16 (runtime.cpp: PTX ISA layouts).
void mma_m16n8k16_sync(int dtype, float* d, const uint32_t* a, uint32_t b0, uint32_t b1, const char* file, int line);

// ldmatrix .x{num}[.trans] for one warp (runtime.cpp: PTX ISA layout); r has num registers.
void ldmatrix_sync(int num, bool trans, uint32_t* r, const void* row, const char* file, int line);
// cp.async: queued per thread, performed (and checked) by the wait that covers its group.
void cp_async(void* dst, const void* src, int src_bytes, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int n);

unsigned char* dynamic_smem();
cudaError_t sm_count(int* sms);

// Runs body(ctx) as every thread of every block of the grid; kernel names the launch in reports.
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, void (*body)(void*), void* ctx);

template <typename... KArgs>
struct LaunchContext {
  void (*kernel)(KArgs...);
  std::tuple<KArgs...> args;
};

template <typename... KArgs>
void launch_body(void* p) {
  auto* c = static_cast<LaunchContext<KArgs...>*>(p);
  std::apply(c->kernel, c->args);
}

template <typename... KArgs>
cudaError_t launch_smem(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, KArgs... args) {
  LaunchContext<KArgs...> ctx{kernel, std::tuple<KArgs...>(args...)};
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, &launch_body<KArgs...>, &ctx);
}

template <typename... KArgs>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, KArgs... args) {
  return launch_smem(kernel, grid, block, 0, args...);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp operand must fit 64 bits");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace emulation
}  // namespace fastlm

#define threadIdx (::fastlm::emulation::g_coords.thread)
#define blockIdx (::fastlm::emulation::g_coords.block)
#define blockDim (::fastlm::emulation::g_coords.block_dim)
#define gridDim (::fastlm::emulation::g_coords.grid_dim)
#define warpSize 32

#define __syncthreads() ::fastlm::emulation::syncthreads(__FILE__, __LINE__)
#define __trap() ::fastlm::emulation::trap(__FILE__, __LINE__)
#define __syncwarp(...) \
  ((void)::fastlm::emulation::warp_collective(::fastlm::emulation::WarpOp::kSync, ::fastlm::emulation::syncwarp_mask(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__))
#define __shfl_sync(mask, v, lane, ...) ::fastlm::emulation::shfl(::fastlm::emulation::WarpOp::kShflIdx, mask, v, lane, ::fastlm::emulation::width_of(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) ::fastlm::emulation::shfl(::fastlm::emulation::WarpOp::kShflUp, mask, v, d, ::fastlm::emulation::width_of(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) ::fastlm::emulation::shfl(::fastlm::emulation::WarpOp::kShflDown, mask, v, d, ::fastlm::emulation::width_of(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) ::fastlm::emulation::shfl(::fastlm::emulation::WarpOp::kShflXor, mask, v, m, ::fastlm::emulation::width_of(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(mask, pred) static_cast<unsigned>(::fastlm::emulation::warp_collective(::fastlm::emulation::WarpOp::kBallot, mask, (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, pred) static_cast<int>(::fastlm::emulation::warp_collective(::fastlm::emulation::WarpOp::kAny, mask, (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, pred) static_cast<int>(::fastlm::emulation::warp_collective(::fastlm::emulation::WarpOp::kAll, mask, (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))

namespace fastlm {
namespace emulation {
constexpr unsigned syncwarp_mask() { return 0xffffffffu; }
constexpr unsigned syncwarp_mask(unsigned m) { return m; }
constexpr int width_of() { return 32; }
constexpr int width_of(int w) { return w; }
template <typename T>
inline T shfl(WarpOp op, unsigned mask, T v, int arg, int width, const char* file, int line) {
  return from_bits<T>(warp_collective(op, mask, to_bits(v), arg, width, file, line));
}
}  // namespace emulation
}  // namespace fastlm

// Atomics: a fiber is never preempted between the read and the write, so plain code is atomic;
// the accesses stay visible to the sanitizer hooks. Each returns the old value.
namespace fastlm {
namespace emulation {
template <typename T, typename F>
inline T atomic_update(T* p, F new_value) {
  const T old = *p;
  *p = new_value(old);
  return old;
}
}  // namespace emulation
}  // namespace fastlm
template <typename T>
inline T atomicAdd(T* p, T v) {
  return fastlm::emulation::atomic_update(p, [v](T old) { return old + v; });
}
template <typename T>
inline T atomicMax(T* p, T v) {
  return fastlm::emulation::atomic_update(p, [v](T old) { return old < v ? v : old; });
}
template <typename T>
inline T atomicMin(T* p, T v) {
  return fastlm::emulation::atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <typename T>
inline T atomicExch(T* p, T v) {
  return fastlm::emulation::atomic_update(p, [v](T) { return v; });
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  return fastlm::emulation::atomic_update(p, [cmp, v](T old) { return old == cmp ? v : old; });
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
