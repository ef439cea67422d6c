// Self-tests of the host emulation, independent of the fastlm kernels: the mma.m16n8k16 fragment
// layout as the PTX ISA states it, and one kernel per sanitizer check with its bug planted
// (kind "none" runs the same kernels with every bug removed, the positive control).
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "host/selftest.h"

namespace fastlm {
namespace {

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (9.7.14.5.8 in the 8.x manuals):
// groupID = %laneid >> 2, threadID_in_group = %laneid % 4;
// A: a0..a7 (registers {a0,a1} {a2,a3} {a4,a5} {a6,a7}), row = groupID for a0, a1, a4, a5 and
//    groupID + 8 for a2, a3, a6, a7; col = threadID_in_group * 2 + (i & 1) for i < 4, + 8 for i >= 4.
// B: b0..b3 (registers {b0,b1} {b2,b3}), row = threadID_in_group * 2 + (i & 1) for i < 2, + 8 for
//    i >= 2; col = groupID.
// C, D: c0..c3, row = groupID for i < 2, groupID + 8 for i >= 2; col = threadID_in_group * 2 + (i & 1).
template <typename T>
__global__ void selftest_mma_kernel(const float* A, const float* B, const float* C, float* D) {
  const int lane = threadIdx.x;
  const int group = lane >> 2, tig = lane % 4;
  uint16_t ah[8], bh[4];
  for (int i = 0; i < 8; ++i) {
    const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? group : group + 8;
    const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    const T v = from_float<T>(A[row * 16 + col]);
    memcpy(&ah[i], &v, 2);
  }
  for (int i = 0; i < 4; ++i) {
    const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
    const T v = from_float<T>(B[row * 8 + group]);
    memcpy(&bh[i], &v, 2);
  }
  uint32_t a[4];
  for (int r = 0; r < 4; ++r) a[r] = static_cast<uint32_t>(ah[2 * r]) | (static_cast<uint32_t>(ah[2 * r + 1]) << 16);
  const uint32_t b0 = static_cast<uint32_t>(bh[0]) | (static_cast<uint32_t>(bh[1]) << 16);
  const uint32_t b1 = static_cast<uint32_t>(bh[2]) | (static_cast<uint32_t>(bh[3]) << 16);
  float d[4];
  for (int i = 0; i < 4; ++i) d[i] = C[(i < 2 ? group : group + 8) * 8 + tig * 2 + (i & 1)];
  mma_m16n8k16<T>(d, a, b0, b1);
  for (int i = 0; i < 4; ++i) D[(i < 2 ? group : group + 8) * 8 + tig * 2 + (i & 1)] = d[i];
}

// 64 threads. Each thread overwrites its own slot and reads its partner's in the other warp.
__global__ void planted_race_kernel(float* out, bool planted) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = 0.f;
  __syncthreads();
  s[t] = static_cast<float>(t);
  if (!planted) __syncthreads();
  out[t] = s[(t + 32) % 64];
}

// 64 threads and an output of `n` floats: thread t writes out[t].
__global__ void planted_oob_store_kernel(float* out) { out[threadIdx.x] = 1.f; }

// 32 threads: thread t writes s[t + shift].
__global__ void planted_shared_oob_kernel(float* out, int shift) {
  __shared__ float s[32];
  const int t = threadIdx.x;
  s[(t + shift) % 33] = 1.f;
  __syncthreads();
  out[t] = t + shift < 32 ? s[t + shift] : 0.f;
}

// 64 threads: threads below `writers` fill s, then every thread reads its slot.
__global__ void planted_uninit_kernel(float* out, int writers) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  if (t < writers) s[t] = 1.f;
  __syncthreads();
  out[t] = s[t];
}

// 64 threads: only threads below `reach` call __syncthreads.
__global__ void planted_barrier_kernel(float* out, int reach) {
  const int t = threadIdx.x;
  if (t < reach) __syncthreads();
  out[t] = 1.f;
}

// 32 threads: lanes below `reach` take part in a full-mask shuffle.
__global__ void planted_warp_kernel(float* out, int reach) {
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  if (t < reach) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[t] = v;
}

// out_bits[i] = the bits of from_float<T>(src[i]); back[i] = to_float of them.
template <typename T>
__global__ void selftest_convert_kernel(const float* src, uint16_t* out_bits, float* back, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T v = from_float<T>(src[i]);
    memcpy(&out_bits[i], &v, 2);
    back[i] = to_float(v);
  }
}

// 64 threads (two warps); row r of out (kWarpRows x 64 ints) holds lane results of warp operation r.
constexpr int kWarpRows = 12;
__global__ void selftest_warp_kernel(int* out) {
  const int t = threadIdx.x;
  const int lane = t & 31;
  const int v = 100 * t;
  int* o = out + t;
  o[0 * 64] = __shfl_sync(0xffffffffu, v, 5);
  o[1 * 64] = __shfl_sync(0xffffffffu, v, lane + 3, 8);
  o[2 * 64] = __shfl_up_sync(0xffffffffu, v, 3);
  o[3 * 64] = __shfl_up_sync(0xffffffffu, v, 2, 16);
  o[4 * 64] = __shfl_down_sync(0xffffffffu, v, 5);
  o[5 * 64] = __shfl_down_sync(0xffffffffu, v, 3, 4);
  o[6 * 64] = __shfl_xor_sync(0xffffffffu, v, 9);
  o[7 * 64] = __shfl_xor_sync(0xffffffffu, v, 3, 8);
  o[8 * 64] = static_cast<int>(__ballot_sync(0xffffffffu, t % 3 == 0));
  o[9 * 64] = __any_sync(0xffffffffu, t == 40);
  o[10 * 64] = __all_sync(0xffffffffu, t != 7);
  int w = -1;
  if (lane < 16) w = __shfl_xor_sync(0x0000ffffu, v, 1);  // a partial mask: only the low half
  __syncwarp();
  o[11 * 64] = w;
}

// 32 threads: the low half shuffles with xor, the high half (when planted) with down, both naming
// the whole warp: neither operation can complete.
__global__ void planted_warp_mismatch_kernel(float* out, bool planted) {
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  if (t < 16 || !planted) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_down_sync(0xffffffffu, v, 1);
  }
  out[t] = v;
}

// 32 threads: four 8x8 b16 matrices, element (i, r, c) = 64 i + 8 r + c, loaded by ldmatrix in
// each form; out (6, 32, 4) uint32: x4, x4.trans, x2, x2.trans, x1, x1.trans per lane.
__global__ void selftest_ldmatrix_kernel(uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[4][8][8];
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) tile[e / 64][e / 8 % 8][e % 8] = static_cast<uint16_t>(e);
  __syncthreads();
  const void* row = &tile[lane / 8][lane % 8][0];
  uint32_t* o = out + lane * 4;
  uint32_t r4[4], r2[2], r1[1];
  ldmatrix<4, false>(r4, row);
  for (int i = 0; i < 4; ++i) o[0 * 128 + i] = r4[i];
  ldmatrix<4, true>(r4, row);
  for (int i = 0; i < 4; ++i) o[1 * 128 + i] = r4[i];
  ldmatrix<2, false>(r2, row);
  for (int i = 0; i < 2; ++i) o[2 * 128 + i] = r2[i];
  ldmatrix<2, true>(r2, row);
  for (int i = 0; i < 2; ++i) o[3 * 128 + i] = r2[i];
  ldmatrix<1, false>(r1, row);
  o[4 * 128] = r1[0];
  ldmatrix<1, true>(r1, row);
  o[5 * 128] = r1[0];
}

// 32 threads: thread t copies 16-byte chunks t (group 0) and 32 + t (group 1) of src into shared
// memory, chunk 63 with 8 source bytes (the rest zero-filled), then reads both back into out. With
// `planted` it waits only for group 0 before reading group 1.
__global__ void planted_cp_async_kernel(float* out, const float* src, bool planted) {
  __shared__ __align__(16) float s[64 * 4];
  const int t = threadIdx.x;
  cp_async_16(&s[t * 4], &src[t * 4]);
  cp_async_commit();
  cp_async_16(&s[(32 + t) * 4], &src[(32 + t) * 4], t == 31 ? 8 : 16);
  cp_async_commit();
  if (planted) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  for (int i = 0; i < 4; ++i) {
    out[t * 4 + i] = s[t * 4 + i];
    out[(32 + t) * 4 + i] = s[(32 + t) * 4 + i];
  }
}

template <typename... KArgs, typename... Args>
int run(void (*kernel)(KArgs...), unsigned threads, float* buf, size_t n, Args... args) {
  emulation::set_extents({{reinterpret_cast<uintptr_t>(buf), n * sizeof(float), "float32[" + std::to_string(n) + "] out"}});
  const int code = launch(kernel, dim3(1), dim3(threads), nullptr, buf, args...);
  emulation::set_extents({});
  return code;
}

}  // namespace

namespace emulation {

int selftest_mma(int dtype, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d) {
  const auto* A = reinterpret_cast<const float*>(a);
  const auto* B = reinterpret_cast<const float*>(b);
  const auto* C = reinterpret_cast<const float*>(c);
  auto* D = reinterpret_cast<float*>(d);
  if (!A || !B || !C || !D) return cudaErrorInvalidValue;
  if (dtype == kFloat16) return fastlm::launch(selftest_mma_kernel<__half>, dim3(1), dim3(32), nullptr, A, B, C, D);
  if (dtype == kBFloat16) return fastlm::launch(selftest_mma_kernel<__nv_bfloat16>, dim3(1), dim3(32), nullptr, A, B, C, D);
  return cudaErrorInvalidValue;
}

int selftest_ldmatrix(uintptr_t out) {
  auto* O = reinterpret_cast<uint32_t*>(out);
  if (!O) return cudaErrorInvalidValue;
  return fastlm::launch(selftest_ldmatrix_kernel, dim3(1), dim3(32), nullptr, O);
}

int selftest_cp_async(uintptr_t out, uintptr_t src, bool planted) {
  auto* O = reinterpret_cast<float*>(out);
  const auto* S = reinterpret_cast<const float*>(src);
  if (!O || !S) return cudaErrorInvalidValue;
  return fastlm::launch(planted_cp_async_kernel, dim3(1), dim3(32), nullptr, O, S, planted);
}

int selftest_warp(uintptr_t out) {
  auto* O = reinterpret_cast<int*>(out);
  if (!O) return cudaErrorInvalidValue;
  return fastlm::launch(selftest_warp_kernel, dim3(1), dim3(64), nullptr, O);
}

int selftest_convert(int dtype, uintptr_t src, uintptr_t out_bits, uintptr_t back, int64_t n) {
  const auto* S = reinterpret_cast<const float*>(src);
  auto* O = reinterpret_cast<uint16_t*>(out_bits);
  auto* Bk = reinterpret_cast<float*>(back);
  if (!S || !O || !Bk || n < 0) return cudaErrorInvalidValue;
  if (dtype == kFloat16) return fastlm::launch(selftest_convert_kernel<__half>, dim3(1), dim3(256), nullptr, S, O, Bk, n);
  if (dtype == kBFloat16) return fastlm::launch(selftest_convert_kernel<__nv_bfloat16>, dim3(1), dim3(256), nullptr, S, O, Bk, n);
  return cudaErrorInvalidValue;
}

int selftest_planted(const std::string& kind) {
  std::vector<float> storage(64);
  float* buf = storage.data();
  const bool none = kind == "none";
  int code = cudaSuccess;
  if (none || kind == "race") code = run(planted_race_kernel, 64, buf, 64, !none);
  if (code == cudaSuccess && (none || kind == "oob_store")) {
    code = none ? run(planted_oob_store_kernel, 64, buf, 64) : run(planted_oob_store_kernel, 64, buf, 63);
  }
  if (code == cudaSuccess && (none || kind == "shared_oob")) code = run(planted_shared_oob_kernel, 32, buf, 32, none ? 0 : 1);
  if (code == cudaSuccess && (none || kind == "uninit_shared")) code = run(planted_uninit_kernel, 64, buf, 64, none ? 64 : 32);
  if (code == cudaSuccess && (none || kind == "divergent_barrier")) code = run(planted_barrier_kernel, 64, buf, 64, none ? 64 : 32);
  if (code == cudaSuccess && (none || kind == "warp_divergence")) code = run(planted_warp_kernel, 32, buf, 32, none ? 32 : 16);
  if (code == cudaSuccess && (none || kind == "warp_mismatch")) code = run(planted_warp_mismatch_kernel, 32, buf, 32, !none);
  if (!none && kind != "race" && kind != "oob_store" && kind != "shared_oob" && kind != "uninit_shared" &&
      kind != "divergent_barrier" && kind != "warp_divergence" && kind != "warp_mismatch") {
    return cudaErrorInvalidValue;
  }
  return code;
}

}  // namespace emulation
}  // namespace fastlm
