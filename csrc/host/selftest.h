// Self-test kernels of the host emulation (csrc/host/selftest.cu, built into fastlm._C_host only).
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace fastlm {
namespace emulation {

// The global-memory extents (address, bytes, label) kernels may touch; [] turns the check off
// (runtime.cpp; Python's emulation_set_extents).
void set_extents(const std::vector<std::tuple<uintptr_t, size_t, std::string>>& extents);

// D (16x8) = A (16x16) B (16x8) + C through mma_m16n8k16, one warp, fragments placed by the PTX ISA
// formulas; a, b, c, d: contiguous fp32 host buffers; dtype 1 (fp16) or 2 (bf16). Returns the code.
int selftest_mma(int dtype, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d);
// out (12, 64) int32: lane results of shuffles (idx, up, down, xor, each with and without a width),
// ballot, any, all and a partial-mask shuffle over two warps (csrc/host/selftest.cu). Returns the code.
int selftest_warp(uintptr_t out);
// out (6, 32, 4) uint32: the registers each lane gets from ldmatrix .x4, .x4.trans, .x2, .x2.trans,
// .x1, .x1.trans over four 8x8 b16 matrices with element (i, r, c) = 64 i + 8 r + c.
int selftest_ldmatrix(uintptr_t out);
// src (256,) fp32 -> out (256,) through two cp.async groups into shared memory (the last 8 bytes
// zero-filled); planted: group 1 read after waiting for group 0 only. Returns the code.
int selftest_cp_async(uintptr_t out, uintptr_t src, bool planted);
// out_bits (n,) uint16 = the bits of from_float<T>(src) for T fp16 (dtype 1) or bf16 (2); back (n,)
// fp32 = to_float of them: the conversions the kernels use. Returns the code.
int selftest_convert(int dtype, uintptr_t src, uintptr_t out_bits, uintptr_t back, int64_t n);
// Runs a kernel with the named bug planted ("race", "oob_store", "shared_oob", "uninit_shared",
// "divergent_barrier", "warp_divergence", "warp_mismatch", "none" for the same kernels without it). Returns the code.
int selftest_planted(const std::string& kind);

}  // namespace emulation
}  // namespace fastlm
