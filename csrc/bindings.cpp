// The fastlm._C module (and, built with FASTLM_HOST_EMULATION, fastlm._C_host: the same launchers
// on the emulated device of csrc/host/, plus its controls): pybind11 bindings of the launchers
// declared in ops.h, plus build and runtime information. Pointers and streams cross as Python ints; launchers return CUDA error codes
// that fastlm.cuda.check turns into exceptions. A new op adds its section of m.def lines below.

#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(FASTLM_HOST_EMULATION)
#include "host/emulation.h"
#else
#include <cuda_runtime.h>
#endif
#include "ops.h"

#ifndef FASTLM_MODULE_NAME
#define FASTLM_MODULE_NAME _C
#endif

#if defined(FASTLM_HOST_EMULATION)
namespace fastlm::emulation {
void bind(pybind11::module_& m);
}
#endif

#ifndef FASTLM_BUILT_ARCHS
#define FASTLM_BUILT_ARCHS ""
#endif

namespace py = pybind11;

namespace {

std::vector<std::string> built_archs() {
  std::vector<std::string> archs;
  std::string item;
  for (const char* p = FASTLM_BUILT_ARCHS;; ++p) {
    if (*p == ',' || *p == '\0') {
      if (!item.empty()) archs.push_back(item);
      item.clear();
      if (*p == '\0') break;
    } else {
      item += *p;
    }
  }
  return archs;
}

int cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(FASTLM_MODULE_NAME, m) {
#if defined(FASTLM_HOST_EMULATION)
  m.doc() = "fastlm CUDA kernels built for the host: each launch runs on the emulated, sanitised device of csrc/host/";
  fastlm::emulation::bind(m);
#else
  m.doc() = "fastlm CUDA kernels (plain CUDA launchers; links only the CUDA runtime)";
#endif

  m.def("error_string", [](int code) { return std::string(cudaGetErrorString(static_cast<cudaError_t>(code))); },
        py::arg("code"), "cudaGetErrorString(code)");
  m.def("built_archs", &built_archs, "CUDA architectures this module was compiled for, e.g. ['80', '90a']");
  m.def("cuda_runtime_version", &cuda_runtime_version, "cudaRuntimeGetVersion (e.g. 13000), 0 if unknown");
  m.def("device_count", &device_count, "number of visible CUDA devices; 0 without a GPU or driver");

  // ---- layer_norm (csrc/layer_norm.cu) ----
  m.def("layer_norm_fwd", &fastlm::layer_norm_fwd, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("y"), py::arg("h"), py::arg("mean"), py::arg("rstd"), py::arg("M"), py::arg("N"),
        py::arg("stride_x"), py::arg("stride_r"), py::arg("stride_y"), py::arg("stride_h"), py::arg("eps"),
        py::arg("is_rms"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("stream"));
  m.def("layer_norm_bwd", &fastlm::layer_norm_bwd, py::arg("dy"), py::arg("dh"), py::arg("x"), py::arg("weight"),
        py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"), py::arg("workspace"),
        py::arg("M"), py::arg("N"), py::arg("stride_dy"), py::arg("stride_dh"), py::arg("stride_x"),
        py::arg("stride_dx"), py::arg("is_rms"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("stream"));
  m.def("layer_norm_bwd_workspace_size", &fastlm::layer_norm_bwd_workspace_size, py::arg("M"), py::arg("N"),
        "bytes of fp32 workspace layer_norm_bwd needs on the current device (-1 if it cannot be queried)");
#if defined(FASTLM_HOST_EMULATION)
  m.def("layer_norm_fwd_host_loads", &fastlm::layer_norm_fwd_host_loads,
        "elements the forward loaded since the last call: [x or h re-read, residual] (host tier only)");
#endif

  // ---- rotary (csrc/rotary.cu) ----
  m.def("rotary", &fastlm::rotary, py::arg("q"), py::arg("k"), py::arg("q_out"), py::arg("k_out"),
        py::arg("positions"), py::arg("pos_bits"), py::arg("cos"), py::arg("sin"), py::arg("table_dtype"),
        py::arg("B"), py::arg("S"), py::arg("HQ"), py::arg("HK"), py::arg("D"), py::arg("rotary_dim"),
        py::arg("strides"), py::arg("offset"), py::arg("theta"), py::arg("interleaved"), py::arg("backward"),
        py::arg("dtype"), py::arg("stream"));
  m.def("rotary_vector_ok", &fastlm::rotary_vector_ok, py::arg("q"), py::arg("k"), py::arg("q_out"),
        py::arg("k_out"), py::arg("cos"), py::arg("sin"), py::arg("table_dtype"), py::arg("B"), py::arg("S"),
        py::arg("HQ"), py::arg("HK"), py::arg("D"), py::arg("rotary_dim"), py::arg("strides"), py::arg("interleaved"),
        py::arg("dtype"), "whether rotary takes the vector (16-byte) path for these arguments");
  m.def("rotary_grids", &fastlm::rotary_grids, py::arg("B"), py::arg("S"), py::arg("HQ"), py::arg("HK"),
        py::arg("rotary_dim"), py::arg("sms"), "the launch grid (x, y, z) of rotary's any-stride path; [] when it exceeds the limits");
  m.def("rotary_block", &fastlm::rotary_block, py::arg("index"), py::arg("B"), py::arg("S"), py::arg("HQ"),
        py::arg("HK"), py::arg("rotary_dim"), py::arg("sms"), "(position block, b, head group) of block index");

  // ---- sinusoidal (csrc/sinusoidal.cu) ----
  m.def("embed_sinusoidal_fwd", &fastlm::embed_sinusoidal_fwd, py::arg("ids"), py::arg("ids_bits"),
        py::arg("weight"), py::arg("positions"), py::arg("pos_bits"), py::arg("out"), py::arg("T"), py::arg("S"),
        py::arg("D"), py::arg("V"), py::arg("s_it"), py::arg("s_is"), py::arg("s_w0"), py::arg("s_w1"),
        py::arg("s_pt"), py::arg("s_ps"), py::arg("s_ot"), py::arg("s_os"), py::arg("s_od"), py::arg("offset"),
        py::arg("scale"), py::arg("has_scale"), py::arg("base"), py::arg("dtype"), py::arg("stream"));
  m.def("embed_sinusoidal_bwd_atomic", &fastlm::embed_sinusoidal_bwd_atomic, py::arg("dout"), py::arg("ids"),
        py::arg("ids_bits"), py::arg("dweight_f32"), py::arg("T"), py::arg("S"), py::arg("D"), py::arg("V"),
        py::arg("s_ot"), py::arg("s_os"), py::arg("s_od"), py::arg("s_it"), py::arg("s_is"), py::arg("scale"),
        py::arg("has_scale"), py::arg("dtype"), py::arg("stream"));
  m.def("embed_sinusoidal_bwd_sorted", &fastlm::embed_sinusoidal_bwd_sorted, py::arg("dout"),
        py::arg("sorted_ids"), py::arg("order"), py::arg("dweight"), py::arg("workspace"), py::arg("N"), py::arg("D"),
        py::arg("V"), py::arg("s_on"), py::arg("s_od"), py::arg("s_w0"), py::arg("scale"), py::arg("has_scale"),
        py::arg("dtype"), py::arg("stream"));
  m.def("embed_bwd_chunk_rows", &fastlm::embed_bwd_chunk_rows, "sorted positions per chunk of the sorted backward");

  // ---- attention (csrc/attention.cu) ----
  m.def("attention_fwd_supported", &fastlm::attention_fwd_supported, py::arg("D"), py::arg("dtype"));
  m.def("attention_fwd_block_rows", &fastlm::attention_fwd_block_rows, "query rows per forward block");
  m.def("attention_fwd", &fastlm::attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("o_part"), py::arg("lse_part"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("Sq"), py::arg("Sk"), py::arg("D"), py::arg("strides"), py::arg("scale"), py::arg("causal"),
        py::arg("window_left"), py::arg("window_right"), py::arg("num_splits"), py::arg("dtype"), py::arg("stream"),
        py::arg("softcap") = 0.0, py::arg("alibi_slopes") = 0, py::arg("alibi_stride_b") = 0, py::arg("dropout_p") = 0.0,
        py::arg("seed") = 0);
  m.def("attention_varlen_fwd", &fastlm::attention_varlen_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("out"), py::arg("lse"), py::arg("o_part"),
        py::arg("lse_part"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("total_q"), py::arg("total_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("D"), py::arg("strides"), py::arg("scale"),
        py::arg("causal"), py::arg("window_left"), py::arg("window_right"), py::arg("num_splits"), py::arg("dtype"),
        py::arg("stream"), py::arg("softcap") = 0.0, py::arg("alibi_slopes") = 0, py::arg("alibi_stride_b") = 0,
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("attention_fwd_grids", &fastlm::attention_fwd_grids, py::arg("B"), py::arg("Hq"), py::arg("Sq"),
        py::arg("num_splits"), "the launch grids (forward[, combine]) attention_fwd uses; [] when they exceed the limits");
  m.def("attention_fwd_block", &fastlm::attention_fwd_block, py::arg("index"), py::arg("Hq"), py::arg("Sq"),
        py::arg("reverse"), py::arg("num_splits"), "(b, h, query block, split) of forward block index");
  m.def("decode_attention_supported", &fastlm::decode_attention_supported, py::arg("D"), py::arg("dtype"));
  m.def("decode_attention_grids", &fastlm::decode_attention_grids, py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("Sq"), py::arg("num_splits"),
        "the grids (split, combine) decode_attention_fwd uses; [] when they exceed the limits");
  m.def("decode_attention_block", &fastlm::decode_attention_block, py::arg("index"), py::arg("Hkv"),
        "(b, kv head) of split block index");
  m.def("decode_attention_fwd", &fastlm::decode_attention_fwd, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("out"), py::arg("lse"), py::arg("o_part"),
        py::arg("lse_part"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Sq"), py::arg("S_max"),
        py::arg("D"), py::arg("strides"), py::arg("num_splits"), py::arg("scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("dtype"), py::arg("stream"), py::arg("block_table") = 0,
        py::arg("block_table_stride") = 0, py::arg("page_size") = 0, py::arg("num_pages") = 0, py::arg("softcap") = 0.0,
        py::arg("alibi_slopes") = 0, py::arg("alibi_stride_b") = 0);
  m.def("paged_kv_append", &fastlm::paged_kv_append, py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"),
        py::arg("cache_seqlens"), py::arg("k_new"), py::arg("v_new"), py::arg("B"), py::arg("Hkv"), py::arg("S_new"),
        py::arg("D"), py::arg("page_size"), py::arg("max_pages"), py::arg("num_pages"), py::arg("strides"),
        py::arg("dtype"), py::arg("stream"));

  // ---- attention backward (csrc/attention_bwd.cu) ----
  m.def("attention_bwd_supported", &fastlm::attention_bwd_supported, py::arg("D"), py::arg("dtype"));
  m.def("attention_bwd_workspace_size", &fastlm::attention_bwd_workspace_size, py::arg("B"), py::arg("Hq"),
        py::arg("Sq"), "fp32 elements of the workspace attention_bwd needs; -1 beyond the limits");
  m.def("attention_bwd_grids", &fastlm::attention_bwd_grids, py::arg("B"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("Sq"), py::arg("Sk"), "the grids (preprocess, dK/dV when Sk > 0, dQ) attention_bwd uses; [] beyond the limits");
  m.def("attention_bwd", &fastlm::attention_bwd, py::arg("dout"), py::arg("dlse"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("workspace"),
        py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Sq"), py::arg("Sk"), py::arg("D"), py::arg("strides"),
        py::arg("scale"), py::arg("causal"), py::arg("window_left"), py::arg("window_right"), py::arg("dtype"),
        py::arg("stream"), py::arg("softcap") = 0.0, py::arg("alibi_slopes") = 0, py::arg("alibi_stride_b") = 0,
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("attention_varlen_bwd", &fastlm::attention_varlen_bwd, py::arg("dout"), py::arg("dlse"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("workspace"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("B"), py::arg("Hq"),
        py::arg("Hkv"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("D"), py::arg("strides"),
        py::arg("scale"), py::arg("causal"), py::arg("window_left"), py::arg("window_right"), py::arg("dtype"),
        py::arg("stream"), py::arg("softcap") = 0.0, py::arg("alibi_slopes") = 0, py::arg("alibi_stride_b") = 0,
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);

  // ---- sampling (csrc/sampling.cu) ----
  m.def("sampling", &fastlm::sampling, py::arg("logits"), py::arg("B"), py::arg("V"), py::arg("stride_x"),
        py::arg("dtype"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
        py::arg("t_val"), py::arg("k_val"), py::arg("p_val"), py::arg("mp_val"), py::arg("use_k"), py::arg("use_p"),
        py::arg("use_mp"), py::arg("seed"), py::arg("tokens"), py::arg("logprobs"), py::arg("out"),
        py::arg("stride_o"), py::arg("loads"), py::arg("num_slices"), py::arg("stats"), py::arg("hist_k"),
        py::arg("hist_p"), py::arg("state"), py::arg("chunk_sum"), py::arg("stream"));
}
