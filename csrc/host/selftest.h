// Self-test kernels of the host emulation (csrc/host/selftest.cu, built into fastlm._C_host only).
#pragma once

#include <cstdint>
#include <string>

namespace fastlm {
namespace emulation {

// D (16x8) = A (16x16) B (16x8) + C through mma_m16n8k16, one warp, fragments placed by the PTX ISA
// formulas; a, b, c, d: contiguous fp32 host buffers; dtype 1 (fp16) or 2 (bf16). Returns the code.
int selftest_mma(int dtype, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d);
// Runs a kernel with the named bug planted ("race", "oob_store", "shared_oob", "uninit_shared",
// "divergent_barrier", "warp_divergence", "none" for the same kernels without it). Returns the code.
int selftest_planted(const std::string& kind);

}  // namespace emulation
}  // namespace fastlm
