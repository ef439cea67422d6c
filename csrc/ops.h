// Declarations of every launcher in csrc/*.cu, one section per op; csrc/bindings.cpp binds them.
// A launcher takes raw device pointers (0 for an absent tensor), sizes, element strides, dtype codes
// (0 fp32, 1 fp16, 2 bf16), and a cudaStream_t as an integer; it returns a cudaError_t code (0 on
// success, cudaErrorInvalidValue for bad arguments) and never throws.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace fastlm {

// ---- layer_norm (csrc/layer_norm.cu) ----
// Forward: y = norm(x + residual) * weight + bias; h = x + residual; mean, rstd per row (fp32).
int layer_norm_fwd(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t h,
                   uintptr_t mean, uintptr_t rstd, int64_t M, int64_t N, int64_t stride_x, int64_t stride_r,
                   int64_t stride_y, int64_t stride_h, double eps, bool is_rms, int x_dtype, int w_dtype,
                   uintptr_t stream);
// Backward: dx (plus dh), and dweight/dbias through an fp32 workspace of
// layer_norm_bwd_workspace_size(M, N) bytes (-1 when the current device cannot be queried).
int layer_norm_bwd(uintptr_t dy, uintptr_t dh, uintptr_t x, uintptr_t weight, uintptr_t mean, uintptr_t rstd,
                   uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t workspace, int64_t M, int64_t N,
                   int64_t stride_dy, int64_t stride_dh, int64_t stride_x, int64_t stride_dx, bool is_rms,
                   int x_dtype, int w_dtype, uintptr_t stream);
int64_t layer_norm_bwd_workspace_size(int64_t M, int64_t N);
#if defined(FASTLM_HOST_EMULATION)
// Host tier only: elements the forward kernels loaded since the last call, {row stream (x, or h on
// a re-read), residual}; the counter is reset. A pass-count probe with no GPU-build counterpart.
std::vector<int64_t> layer_norm_fwd_host_loads();
#endif

// ---- rotary (csrc/rotary.cu) ----
// Rotates q (B, HQ, S, D) and k (B, HK, S, D) into q_out, k_out (which may be q, k: in place) by
// pos * theta^(-2p/R) (angle form: positions int32/int64 (pos_bits 32/64) with (b, s) strides, or
// 0 for pos = offset + s; cos = sin = 0), or by cos/sin tables (B or 1, S, R) of table_dtype (table
// form; positions and theta ignored). backward: the transposed map (rotation by -angle). strides:
// 24 element strides: q, k, q_out, k_out as (b, h, s, d), positions (b, s), cos (b, s, d),
// sin (b, s, d); 0 on a broadcast batch. Dims R..D-1 are copied unless q_out == q and k_out == k.
int rotary(uintptr_t q, uintptr_t k, uintptr_t q_out, uintptr_t k_out, uintptr_t positions, int pos_bits,
           uintptr_t cos, uintptr_t sin, int table_dtype, int64_t B, int64_t S, int64_t HQ, int64_t HK, int64_t D,
           int64_t rotary_dim, const std::vector<int64_t>& strides, int64_t offset, double theta, bool interleaved,
           bool backward, int dtype, uintptr_t stream);
// Whether rotary takes the vector path (16-byte chunks) for these arguments: q, k, q_out, k_out
// (and the tables) with 16-byte aligned rows, unit-stride d, row strides in whole 16-byte chunks,
// (interleaved ? R : R/2) and D multiples of 16 / sizeof(dtype), tables half split; else the
// any-stride path.
bool rotary_vector_ok(uintptr_t q, uintptr_t k, uintptr_t q_out, uintptr_t k_out, uintptr_t cos, uintptr_t sin,
                      int table_dtype, int64_t B, int64_t S, int64_t HQ, int64_t HK, int64_t D, int64_t rotary_dim,
                      const std::vector<int64_t>& strides, bool interleaved, int dtype);
// The grid rotary's any-stride path launches (one kernel) on a device with `sms` SMs, or none when
// it would exceed 2^31 - 1 blocks; rotary_block: the (position block, b, head group) of block
// `index`, for tests.
std::vector<std::array<int64_t, 3>> rotary_grids(int64_t B, int64_t S, int64_t HQ, int64_t HK, int64_t rotary_dim,
                                                 int64_t sms);
std::array<int64_t, 3> rotary_block(int64_t index, int64_t B, int64_t S, int64_t HQ, int64_t HK, int64_t rotary_dim,
                                    int64_t sms);

// ---- sinusoidal (csrc/sinusoidal.cu) ----
// out (T, S, D) = weight[ids] * scale + PE(pos), PE(pos, 2i) = sin(pos base^(-2i/D)), PE(pos, 2i+1) =
// cos(...); ids and weight 0 for the table alone; positions (T or 1, S) (s_pt 0 when broadcast) or
// 0 for pos = offset + s. Out-of-range ids give NaN rows and are never read.
int embed_sinusoidal_fwd(uintptr_t ids, int ids_bits, uintptr_t weight, uintptr_t positions, int pos_bits,
                         uintptr_t out, int64_t T, int64_t S, int64_t D, int64_t V, int64_t s_it, int64_t s_is,
                         int64_t s_w0, int64_t s_w1, int64_t s_pt, int64_t s_ps, int64_t s_ot, int64_t s_os,
                         int64_t s_od, int64_t offset, double scale, bool has_scale, double base, int dtype,
                         uintptr_t stream);
// dweight_f32 (V, D) fp32, contiguous, zeroed by the caller: += scale * dout rows per valid id (atomic).
int embed_sinusoidal_bwd_atomic(uintptr_t dout, uintptr_t ids, int ids_bits, uintptr_t dweight_f32, int64_t T,
                                int64_t S, int64_t D, int64_t V, int64_t s_ot, int64_t s_os, int64_t s_od,
                                int64_t s_it, int64_t s_is, double scale, bool has_scale, int dtype,
                                uintptr_t stream);
// Deterministic: sorted_ids (N,) int64 sorted stably and order (N,) int64 their token indices;
// dweight (V, D) in dtype with unit column stride, zeroed by the caller, gets each run's sum times
// scale; workspace fp32 (ceil(N / embed_bwd_chunk_rows()), 2, D), contiguous, no initial value.
int embed_sinusoidal_bwd_sorted(uintptr_t dout, uintptr_t sorted_ids, uintptr_t order, uintptr_t dweight,
                                uintptr_t workspace, int64_t N, int64_t D, int64_t V, int64_t s_on, int64_t s_od,
                                int64_t s_w0, double scale, bool has_scale, int dtype, uintptr_t stream);
// Sorted positions per chunk of the deterministic backward's segmented reduction.
int embed_bwd_chunk_rows();

// ---- sampling (csrc/sampling.cu) ----
// One token per row of logits (B, V) (out == 0), or the filtered logits into out (B, V) (out != 0;
// tokens then receives the row status). Per-row parameters: temperature, top_p, min_p fp32 and
// top_k int64 (B,) tensors, or 0 to use t_val, k_val, p_val, mp_val; use_k/use_p/use_mp say whether
// any row may filter. seed: int64 [seed, offset] on the device (sampling). tokens (B,) int64: the
// token or a negative row status; logprobs (B,) fp32 or 0. V <= 2^22. See fastlm/reference/sampling.py.
// loads: (B,) int64 (zeroed) receiving the logits elements each row loaded, or 0. num_slices in
// [1, ceil(V / 2048)] blocks per row. Workspaces on the logits' device: stats (B, num_slices, 3)
// int64, state (B, 6, 2) int64, hist_k (B, 3, 2048) int32 zeroed (use_k), hist_p (B, 3, 2048) int64
// zeroed (use_p), chunk_sum (B, ceil(V / 2048)) int64 (sampling). All passes go on `stream`, no sync.
int sampling(uintptr_t logits, int64_t B, int64_t V, int64_t stride_x, int dtype, uintptr_t temperature,
             uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, double t_val, int64_t k_val, double p_val,
             double mp_val, bool use_k, bool use_p, bool use_mp, uintptr_t seed, uintptr_t tokens, uintptr_t logprobs,
             uintptr_t out, int64_t stride_o, uintptr_t loads, int64_t num_slices, uintptr_t stats, uintptr_t hist_k,
             uintptr_t hist_p, uintptr_t state, uintptr_t chunk_sum, uintptr_t stream);

// ---- attention (csrc/attention.cu) ----
// Forward, FlashAttention-2 class: out (B, Hq, Sq, D) and lse (B, Hq, Sq) fp32 from q (B, Hq, Sq, D),
// k/v (B, Hkv, Sk, D); causal aligns bottom-right (query i sees keys j <= i + Sk - Sq), windows as
// fastlm/reference/attention.py (window_left/right -1: unbounded; causal caps right at 0). fp16/bf16,
// D = 64, 96 or 128 (attention_fwd_supported), scale > 0. num_splits > 1 splits each query block's
// key tiles over that many blocks, whose fp32 partials o_part (num_splits, B * Hq * Sq, D) and
// lse_part (num_splits, B * Hq * Sq) a combine kernel merges (both 0 when num_splits == 1).
// strides: 14 element strides: q, k, v, out as (b, h, s) (multiples of 8; d unit-stride), lse (b, h)
// (s unit-stride); pointers 16-byte aligned. B * Hq * ceil(Sq / 128) * num_splits <= 2^31 - 1 blocks,
// Sq + Sk <= 2^30 - 1.
bool attention_fwd_supported(int64_t D, int dtype);
int64_t attention_fwd_block_rows();  // query rows per block (128)
// Launch grids: the (x, y, z) of each kernel the launcher runs for these sizes, in launch order, or
// none when the sizes exceed the grid limits (the launcher then returns cudaErrorInvalidValue).
// *_block: the coordinates the kernel derives from its block index (blockIdx.x), for tests.
std::vector<std::array<int64_t, 3>> attention_fwd_grids(int64_t B, int64_t Hq, int64_t Sq, int64_t num_splits);
// (b, h, query block, split); reverse: the order of a causal forward with no left window
std::array<int64_t, 4> attention_fwd_block(int64_t index, int64_t Hq, int64_t Sq, bool reverse, int64_t num_splits);
// Options (fastlm/reference/attention.py, "Options"; any of them set runs the OPTIONS kernels):
// softcap >= 0 (0: off); alibi_slopes: fp32 slopes at alibi_slopes[b * alibi_stride_b + h] (0: off;
// stride 0 for (Hq,) slopes); dropout_p in [0, 1) with seed an int64 [seed, offset] on the device.
int attention_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t o_part,
                  uintptr_t lse_part, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D,
                  const std::vector<int64_t>& strides, double scale, bool causal, int64_t window_left,
                  int64_t window_right, int64_t num_splits, int dtype, uintptr_t stream, double softcap = 0.0,
                  uintptr_t alibi_slopes = 0, int64_t alibi_stride_b = 0, double dropout_p = 0.0, uintptr_t seed = 0);
// Packed forward (the VARLEN kernels): q (total_q, Hq, D), k/v (total_k, Hkv, D), out like q, lse
// (Hq, total_q) fp32; cu_seqlens_q/k (B + 1,) int32 on the device, sequence b owning query rows
// [cu_q[b], cu_q[b + 1]) and key rows likewise, each computed as attention_fwd computes it alone
// (dropout rows: the packed rows). The grid is B * Hq * ceil(max_seqlen_q / 128) * num_splits blocks;
// a block past its sequence's end exits, so max_seqlen_* must be at least every length (not checked:
// no host sync). Partials o_part (num_splits, Hq * total_q, D), lse_part (num_splits, Hq * total_q).
// strides: 9 element strides: q, k, v, out as (row, head) (multiples of 8; d unit-stride), lse's head
// stride (row unit-stride). total_q + total_k <= 2^30 - 1, Hq * total_q <= 2^31 - 1.
int attention_varlen_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k,
                         uintptr_t out, uintptr_t lse, uintptr_t o_part, uintptr_t lse_part, int64_t B, int64_t Hq,
                         int64_t Hkv, int64_t total_q, int64_t total_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                         int64_t D, const std::vector<int64_t>& strides, double scale, bool causal, int64_t window_left,
                         int64_t window_right, int64_t num_splits, int dtype, uintptr_t stream, double softcap = 0.0,
                         uintptr_t alibi_slopes = 0, int64_t alibi_stride_b = 0, double dropout_p = 0.0,
                         uintptr_t seed = 0);

// ---- decode_attention (csrc/decode_attention.cu) ----
// Decode (split-KV + combine): q (B, Hq, Sq, D) over caches (B, Hkv, S_max, D) with lengths
// cache_seqlens (B,) int32 (clamped to [0, S_max]); causal within each sequence, optional left
// window (window_left >= 0; window_right is capped at 0). o_part (num_splits, B, Hq, Sq, D) and
// lse_part (num_splits, B, Hq, Sq) fp32 workspaces (unused, may be 0, when num_splits == 1: the split
// kernel then writes out and lse itself). fp16/bf16, D = 64, 128, 256
// (decode_attention_supported), (Hq / Hkv) * Sq <= 64 rows per key/value head, B * Hkv <= 2^31 - 1,
// num_splits <= 65535 (decode_attention_grids: split grid (B * Hkv, num_splits, 1), then combine);
// strides as for attention_fwd (k/v (b, h, s) 16-byte multiples).
bool decode_attention_supported(int64_t D, int dtype);
std::vector<std::array<int64_t, 3>> decode_attention_grids(int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq,
                                                           int64_t num_splits);
std::array<int64_t, 2> decode_attention_block(int64_t index, int64_t Hkv);  // (b, kv head) of a split block
int decode_attention_fwd(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t cache_seqlens, uintptr_t out,
                         uintptr_t lse, uintptr_t o_part, uintptr_t lse_part, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t Sq, int64_t S_max, int64_t D, const std::vector<int64_t>& strides, int64_t num_splits,
                         double scale, int64_t window_left, int64_t window_right, int dtype, uintptr_t stream,
                         uintptr_t block_table = 0, int64_t block_table_stride = 0, int64_t page_size = 0,
                         int64_t num_pages = 0, double softcap = 0.0, uintptr_t alibi_slopes = 0,
                         int64_t alibi_stride_b = 0);
// Options (the OPTIONS kernels when one is set): softcap >= 0 (0: off) and ALiBi fp32 slopes at
// alibi_slopes[b * alibi_stride_b + query head] (0: off), as for attention_fwd.
// Paged caches (block_table != 0): k_cache / v_cache (num_pages, Hkv, page_size, D) with strides
// (page, head, row), page_size a power of two in [16, 256], S_max = max_pages * page_size, block_table
// (B, max_pages) int32 with row stride block_table_stride; key j of sequence b is row j % page_size of
// page block_table[b, j / page_size] (clamped to [0, num_pages)).

// paged_kv_append: k_new, v_new (B, Hkv, S_new, D) to positions cache_seqlens[b] + s of the paged
// caches (as above, any power-of-two page_size), in place; positions beyond max_pages * page_size and
// page ids outside [0, num_pages) are skipped. strides: k_new, v_new, k_cache, v_cache (3 each, unit
// stride in D), block_table's row stride. fp32/fp16/bf16; 16-byte copies when D and every stride are
// multiples of 16 bytes and the four base pointers 16-byte aligned, else element copies.
int paged_kv_append(uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_table, uintptr_t cache_seqlens, uintptr_t k_new,
                    uintptr_t v_new, int64_t B, int64_t Hkv, int64_t S_new, int64_t D, int64_t page_size, int64_t max_pages,
                    int64_t num_pages, const std::vector<int64_t>& strides, int dtype, uintptr_t stream);

// ---- attention backward (csrc/attention_bwd.cu) ----
// dq (like q), dk, dv (like k, v) from dout (like out), q, k, v, out and the forward's lse (B, Hq, Sq)
// fp32; dlse (B, Hq, Sq) fp32 or 0 enters as delta_i - dlse_i. Causal and windows as for the Triton
// kernels (window sides -1 = unbounded, causal caps the right side at 0, bottom-right aligned).
// workspace: attention_bwd_workspace_size(B, Hq, Sq) fp32 elements, 16-byte aligned. fp16/bf16,
// D = 64 or 128 (attention_bwd_supported), grids within the limits (attention_bwd_grids: preprocess,
// dK/dV (only when Sk > 0), dQ). strides: 28 element strides: q, k, v, out, dout, dq, dk, dv as
// (b, h, s) (multiples of 8; d unit-stride), lse (b, h), dlse (b, h) (s unit-stride). Sq == 0 does
// nothing (the caller zeroes dk, dv); Sk == 0 writes dq = 0. Deterministic (no atomics).
// Options (fastlm/reference/attention.py, "Options"): softcap >= 0 (0: off); alibi_slopes fp32 at
// slopes[b * alibi_stride_b + h] (0: off); dropout_p in [0, 1) with seed an int64 [seed, offset] on the
// device (read there: no host sync), dropout recomputed from it as in the forward.
bool attention_bwd_supported(int64_t D, int dtype);
int64_t attention_bwd_workspace_size(int64_t B, int64_t Hq, int64_t Sq);  // -1 beyond the limits
std::vector<std::array<int64_t, 3>> attention_bwd_grids(int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk);
int attention_bwd(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                  uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t workspace, int64_t B, int64_t Hq, int64_t Hkv,
                  int64_t Sq, int64_t Sk, int64_t D, const std::vector<int64_t>& strides, double scale, bool causal,
                  int64_t window_left, int64_t window_right, int dtype, uintptr_t stream, double softcap = 0.0,
                  uintptr_t alibi_slopes = 0, int64_t alibi_stride_b = 0, double dropout_p = 0.0, uintptr_t seed = 0);
// Packed sequences: q, out, dout, dq (Tq, Hq, D), k, v, dk, dv (Tk, Hkv, D), lse and dlse (Hq, Tq); sequence
// b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) and key rows likewise (int32 (B + 1,) on the
// device, read there: no host sync) and gets exactly attention_bwd of that sequence alone; key rows of a
// sequence with no queries get dk = dv = 0. strides as for attention_bwd with the packed tensors seen as
// (1, H, T, D) (the b strides are ignored); workspace attention_bwd_workspace_size(B, Hq, max_seqlen_q),
// grids attention_bwd_grids(B, Hq, Hkv, max_seqlen_q, max_seqlen_k); max_seqlen_* at least every length.
int attention_varlen_bwd(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                         uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t workspace, uintptr_t cu_seqlens_q,
                         uintptr_t cu_seqlens_k, int64_t B, int64_t Hq, int64_t Hkv, int64_t max_seqlen_q, int64_t max_seqlen_k,
                         int64_t D, const std::vector<int64_t>& strides, double scale, bool causal, int64_t window_left,
                         int64_t window_right, int dtype, uintptr_t stream, double softcap = 0.0, uintptr_t alibi_slopes = 0,
                         int64_t alibi_stride_b = 0, double dropout_p = 0.0, uintptr_t seed = 0);

}  // namespace fastlm
