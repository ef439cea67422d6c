// LayerNorm and RMSNorm over the last dimension of an (M, N) matrix, with an optional fused
// residual add, forward and backward, for fp32/fp16/bf16 inputs and weights in the input's dtype
// or fp32. Statistics and arithmetic are fp32. With a residual, h = x + residual is rounded to the
// input dtype and that stored value is normalized (as fastlm.reference.add_layer_norm does), so
// the forward agrees with the backward, which gets h as its input.
//
// The forward pass holds a row in registers (32 values per thread, 32..512 threads per row,
// several rows per block for small N), so x is read from DRAM once and the variance is a centred
// second pass over registers instead of E[x^2] - mean^2. Rows longer than one register tile (16384
// elements; 4096 on the scalar path) take two passes: pass 1 reads x (and the residual, writing h)
// into per-thread (count, mean, M2) triples merged by Chan's rule, pass 2 re-reads h (or x) and
// writes y. The backward pass of one-tile rows keeps the fp32 weight/bias gradient partials of its
// columns in registers and reads x and dy a second time in its second pass (from L1/L2). Longer
// rows take two kernels: the row dot products, then dx by (column block, row group) blocks that
// keep their partials in registers and load the next row while computing this one. Loads and
// stores are 128-bit when pointers, strides and N allow, scalar otherwise. The backward pass is
// deterministic: each block owns a fixed range of rows and writes its fp32 partial sums to a
// workspace row, and a second kernel sums the partials in a fixed order; the number of blocks
// depends only on (M, N, dtype, SM count).
//
// Outputs are written in the pass that last reads the corresponding inputs, so y and h may be the
// very buffers x or residual (same pointer, same strides), and dx may be dy or dh.

#include "common.h"
#include "ops.h"

namespace fastlm {
namespace {

constexpr int kMaxThreads = 512;     // threads per block, and per row
constexpr int kRowsThreads = 256;    // target block size when one row needs fewer threads
constexpr int kCombineFloats = 4096; // shared buffer that merges a block's per-row-slot partials
constexpr int kDxThreads = 256;     // long-row backward pass 2: threads (chunks of VEC columns) per block

// Values of a row a thread keeps in registers in the forward pass. The scalar path (VEC == 1, for
// odd sizes and unaligned rows) keeps fewer: its loops are unrolled, and it is a fallback.
template <typename T, int VEC>
__host__ __device__ constexpr int fwd_elems() {
  return VEC == 1 ? 8 : 32;
}

// Columns of a row a thread owns in the backward pass (fp32 dweight and dbias accumulators each).
template <typename T, int VEC>
__host__ __device__ constexpr int bwd_elems() {
  return VEC == 1 ? 8 : (sizeof(T) == 2 ? 32 : 16);
}

__device__ __forceinline__ float add(float a, float b) { return a + b; }
__device__ __forceinline__ float2 add(float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }

// Sum over the blockDim.x threads of one row (row = threadIdx.y; blockDim.x is a multiple of 32),
// identical on every thread of the row. red holds blockDim.y * blockDim.x / 32 slots and must not
// be the buffer the previous row_sum call used (callers alternate two buffers).
template <typename V>
__device__ __forceinline__ V row_sum(V v, V* red) {
  v = warp_sum(v);
  const int warps = blockDim.x >> 5;
  if (warps == 1) return v;
  V* slots = red + threadIdx.y * warps;
  if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = v;
  __syncthreads();
  V total = slots[0];
  for (int w = 1; w < warps; ++w) total = add(total, slots[w]);
  return total;
}

template <typename W, int VEC>
__device__ __forceinline__ void load_param(const W* p, int64_t c, float fill, float (&out)[VEC]) {
  if (p != nullptr) {
    load_float<W, VEC>(p + c * VEC, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fill;
  }
}

#if defined(FASTLM_HOST_EMULATION)
int64_t g_fwd_loads[2] = {0, 0};  // host-tier pass-count probe: elements of {x or h, residual} loaded
#endif

// v[i] = x + residual (rounded to T: the value h holds) for chunk c = first + i * blockDim.x +
// threadIdx.x of the row; 0 where the chunk is past the row (or the row past M).
template <typename T, int VEC, int ITERS>
__device__ __forceinline__ void load_tile(float (&v)[ITERS][VEC], const T* xr, const T* rr, int64_t first,
                                          int64_t chunks, bool row_ok) {
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int64_t c = first + (int64_t)i * blockDim.x + threadIdx.x;
    if (row_ok && c < chunks) {
      load_float<T, VEC>(xr + c * VEC, v[i]);
#if defined(FASTLM_HOST_EMULATION)
      g_fwd_loads[0] += VEC;
      if (rr != nullptr) g_fwd_loads[1] += VEC;
#endif
      if (rr != nullptr) {
        float r[VEC];
        load_float<T, VEC>(rr + c * VEC, r);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = to_float(from_float<T>(v[i][j] + r[j]));
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
    }
  }
}

// Forward, one row per blockDim.x threads, blockDim.y rows per block, grid-stride over rows.
//   h = v = x + residual   (summed in fp32, rounded to T: the residual stream normalized as stored)
//   LN:   mean = sum(v) / N,  var = sum((v - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
//         y = (v - mean) * rstd * w + b
//   RMS:  rstd = 1 / sqrt(sum(v^2) / N + eps),  y = v * rstd * w + b
// Each thread holds chunks c = t * tile + i * blockDim.x + threadIdx.x (VEC elements each) of tile
// t. With one tile the row stays in registers: one read, a centred second pass over registers.
// With several, pass 1 reads x (and residual, writing h) and keeps per-thread (count, mean, M2),
// each tile's centred sums merged by Chan's rule; the row merges the threads' triples the same
// way (mean = sum / N, M2 = sum(M2_t + n_t (mean_t - mean)^2)). Pass 2 re-reads h (or x) once.
template <typename T, typename W, bool IS_RMS, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_fwd_kernel(const T* x, const T* residual, const W* __restrict__ weight, const W* __restrict__ bias,
                          T* y, T* h, float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t M,
                          int64_t N, int64_t stride_x, int64_t stride_r, int64_t stride_y, int64_t stride_h,
                          float eps) {
  constexpr int ITERS = fwd_elems<T, VEC>() / VEC;
  __shared__ float red[2][kMaxThreads / 32];
  const int64_t chunks = N / VEC;
  const int64_t tile = (int64_t)blockDim.x * ITERS;
  const int64_t ntiles = ceil_div(chunks, tile);
  const float n = static_cast<float>(N);
  int buf = 0;
  float v[ITERS][VEC];

  for (int64_t row0 = (int64_t)blockIdx.x * blockDim.y; row0 < M; row0 += (int64_t)gridDim.x * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool row_ok = row < M;
    const int64_t r = row_ok ? row : 0;
    const T* xr = x + r * stride_x;
    const T* rr = residual != nullptr ? residual + r * stride_r : nullptr;
    T* hr = h != nullptr ? h + r * stride_h : nullptr;

    // Pass 1. acc: the thread's sum (LN, one tile) or sum of squares (RMS). Several tiles (LN):
    // the thread's (cnt, mu, m2), mu its mean less the shift K = h[row, 0], which keeps the sums of
    // small deviations exact where a plain sum of values near a large mean would round.
    float acc = 0.f, cnt = 0.f, mu = 0.f, m2 = 0.f, shift = 0.f;
    const bool chan = !IS_RMS && ntiles > 1;
    if (chan) {
      if (row_ok) shift = rr != nullptr ? to_float(from_float<T>(to_float(xr[0]) + to_float(rr[0]))) : to_float(xr[0]);
      __syncthreads();  // every thread has its shift before h (which may be x) is written
    }
    for (int64_t t = 0; t < ntiles; ++t) {
      load_tile<T, VEC, ITERS>(v, xr, rr, t * tile, chunks, row_ok);
      float s = 0.f, k = 0.f;
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int64_t c = t * tile + (int64_t)i * blockDim.x + threadIdx.x;
        if (row_ok && c < chunks) {
          if (hr != nullptr) store_float<T, VEC>(hr + c * VEC, v[i]);
          k += VEC;
#pragma unroll
          for (int j = 0; j < VEC; ++j) s += IS_RMS ? v[i][j] * v[i][j] : v[i][j] - shift;
        }
      }
      if (!chan) {
        acc += s;
      } else if (k > 0.f) {
        const float m = s / k;
        float q = 0.f;
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
          const int64_t c = t * tile + (int64_t)i * blockDim.x + threadIdx.x;
          if (row_ok && c < chunks) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const float d = v[i][j] - shift - m;
              q += d * d;
            }
          }
        }
        const float total = cnt + k;
        const float delta = m - mu;
        mu += delta * (k / total);
        m2 += q + delta * delta * (cnt * k / total);
        cnt = total;
      }
    }
    float mean = 0.f;
    if (!IS_RMS) {
      const float off = row_sum(chan ? cnt * mu : acc, red[buf]) / n;
      buf ^= 1;
      mean = shift + off;
      acc = 0.f;
      if (!chan) {
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
          const int64_t c = (int64_t)i * blockDim.x + threadIdx.x;
          if (row_ok && c < chunks) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const float d = v[i][j] - mean;
              acc += d * d;
            }
          }
        }
      } else {
        const float d = mu - off;
        acc = m2 + cnt * d * d;
      }
    }
    const float var = row_sum(acc, red[buf]) / n;
    buf ^= 1;
    const float rstd = 1.f / sqrtf(var + eps);
    if (row_ok && threadIdx.x == 0) {
      if (!IS_RMS && mean_out != nullptr) mean_out[row] = mean;
      if (rstd_out != nullptr) rstd_out[row] = rstd;
    }

    // Pass 2 (several tiles: re-read h, the stored residual sum, or x).
    for (int64_t t = 0; t < ntiles; ++t) {
      if (ntiles > 1) {
        if (hr != nullptr)
          load_tile<T, VEC, ITERS>(v, hr, nullptr, t * tile, chunks, row_ok);
        else
          load_tile<T, VEC, ITERS>(v, xr, rr, t * tile, chunks, row_ok);
      }
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int64_t c = t * tile + (int64_t)i * blockDim.x + threadIdx.x;
        if (row_ok && c < chunks) {
          float w[VEC], b[VEC], out[VEC];
          load_param<W, VEC>(weight, c, 1.f, w);
          load_param<W, VEC>(bias, c, 0.f, b);
#pragma unroll
          for (int j = 0; j < VEC; ++j) out[j] = (v[i][j] - mean) * rstd * w[j] + b[j];
          store_float<T, VEC>(y + row * stride_y + c * VEC, out);
        }
      }
    }
  }
}

// Writes the block's partial sums for the columns of a one-tile row to dst (a workspace row): each
// row slot's (threadIdx.y's) registers are added into `combine` in slot order, then stored.
template <int VEC, int ITERS>
__device__ __forceinline__ void write_partials(const float (&acc)[ITERS][VEC], float* dst, int64_t chunks,
                                               float* combine) {
  if (dst == nullptr) return;
  if (blockDim.y == 1) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int64_t c = (int64_t)i * blockDim.x + threadIdx.x;
      if (c < chunks) store_float<float, VEC>(dst + c * VEC, acc[i]);
    }
    return;
  }
  for (int y = 0; y < (int)blockDim.y; ++y) {
    if ((int)threadIdx.y == y) {
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int64_t c = (int64_t)i * blockDim.x + threadIdx.x;
        if (c < chunks) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) combine[c * VEC + j] = y == 0 ? acc[i][j] : combine[c * VEC + j] + acc[i][j];
        }
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int64_t c = (int64_t)i * blockDim.x + threadIdx.x;
      if (c < chunks) {
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = combine[c * VEC + j];
        store_float<float, VEC>(dst + c * VEC, o);
      }
    }
  }
  __syncthreads();
}

// Backward stage 1 of rows of one tile. Block s owns rows [s*M/G, (s+1)*M/G) (G = gridDim.x),
// taken blockDim.y at a time, one row per blockDim.x threads.
//   xhat = (x - mean) * rstd  (RMS: x * rstd),   g = dy * w
//   LN:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh
//   RMS: dx = rstd * (g - xhat * mean(g * xhat)) + dh
//   part_dw[s] = sum over the block's rows of dy * xhat,   part_db[s] = sum of dy
// The thread's partials stay in registers and are merged across the block's row slots
// (threadIdx.y, in order) at the end. Each column has one owner thread per block.
template <typename T, typename W, bool IS_RMS, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_bwd_kernel(const T* dy, const T* dh, const T* x, const W* __restrict__ weight,
                          const float* __restrict__ mean, const float* __restrict__ rstd, T* dx,
                          float* __restrict__ part_dw, float* __restrict__ part_db, int64_t M, int64_t N,
                          int64_t stride_dy, int64_t stride_dh, int64_t stride_x, int64_t stride_dx) {
  constexpr int ITERS = bwd_elems<T, VEC>() / VEC;
  __shared__ float2 red[2][kMaxThreads / 32];
  __shared__ float combine[kCombineFloats];
  const int64_t chunks = N / VEC;
  const int64_t tile = (int64_t)blockDim.x * ITERS;
  const int64_t ntiles = ceil_div(chunks, tile);
  const float n = static_cast<float>(N);
  const int64_t slot = blockIdx.x;
  const int64_t row_begin = slot * M / gridDim.x;
  const int64_t row_end = (slot + 1) * M / gridDim.x;
  const int64_t steps = ceil_div(row_end - row_begin, (int64_t)blockDim.y);
  float* slot_dw = part_dw != nullptr ? part_dw + slot * N : nullptr;
  float* slot_db = part_db != nullptr ? part_db + slot * N : nullptr;

  float acc_dw[ITERS][VEC], acc_db[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc_dw[i][j] = acc_db[i][j] = 0.f;
  int buf = 0;

  for (int64_t k = 0; k < steps; ++k) {
    const int64_t row = row_begin + k * blockDim.y + threadIdx.y;
    const bool row_ok = row < row_end;
    const int64_t r = row_ok ? row : 0;
    const T* xr = x + r * stride_x;
    const T* dyr = dy + r * stride_dy;
    const float mu = (!IS_RMS && row_ok) ? mean[r] : 0.f;
    const float rs = row_ok ? rstd[r] : 0.f;

    float2 s = make_float2(0.f, 0.f);  // (sum g * xhat, sum g)
    for (int64_t t = 0; t < ntiles; ++t) {
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int64_t c = t * tile + (int64_t)i * blockDim.x + threadIdx.x;
        if (row_ok && c < chunks) {
          float xv[VEC], dyv[VEC], w[VEC];
          load_float<T, VEC>(xr + c * VEC, xv);
          load_float<T, VEC>(dyr + c * VEC, dyv);
          load_param<W, VEC>(weight, c, 1.f, w);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float xhat = (xv[j] - mu) * rs;
            const float g = dyv[j] * w[j];
            s.x += g * xhat;
            s.y += g;
          }
        }
      }
    }
    s = row_sum(s, red[buf]);
    buf ^= 1;
    const float mean_gx = s.x / n;
    const float mean_g = IS_RMS ? 0.f : s.y / n;

    for (int64_t t = 0; t < ntiles; ++t) {
#pragma unroll
      for (int i = 0; i < ITERS; ++i) {
        const int64_t c = t * tile + (int64_t)i * blockDim.x + threadIdx.x;
        if (row_ok && c < chunks) {
          float xv[VEC], dyv[VEC], w[VEC], d[VEC], out[VEC], pdw[VEC], pdb[VEC];
          load_float<T, VEC>(xr + c * VEC, xv);
          load_float<T, VEC>(dyr + c * VEC, dyv);
          load_param<W, VEC>(weight, c, 1.f, w);
          if (dh != nullptr) {
            load_float<T, VEC>(dh + row * stride_dh + c * VEC, d);
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) d[j] = 0.f;
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float xhat = (xv[j] - mu) * rs;
            const float g = dyv[j] * w[j];
            out[j] = rs * (g - mean_g - xhat * mean_gx) + d[j];
            pdw[j] = dyv[j] * xhat;
            pdb[j] = dyv[j];
          }
          store_float<T, VEC>(dx + row * stride_dx + c * VEC, out);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            acc_dw[i][j] += pdw[j];
            acc_db[i][j] += pdb[j];
          }
        }
      }
    }
  }

  write_partials<VEC, ITERS>(acc_dw, slot_dw, chunks, combine);
  write_partials<VEC, ITERS>(acc_db, slot_db, chunks, combine);
}

// Long-row backward, pass 1 (rows of several tiles): one row per block (blockDim.y == 1),
// grid-stride over rows; x, dy and the weight read once.
//   dots[2 r] = mean(g * xhat),  dots[2 r + 1] = mean(g) (0 for RMS),  g = dy * w
template <typename T, typename W, bool IS_RMS, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_bwd_dots_kernel(const T* dy, const T* x, const W* __restrict__ weight, const float* __restrict__ mean,
                               const float* __restrict__ rstd, float* __restrict__ dots, int64_t M, int64_t N,
                               int64_t stride_dy, int64_t stride_x) {
  __shared__ float2 red[2][kMaxThreads / 32];
  const int64_t chunks = N / VEC;
  const float n = static_cast<float>(N);
  int buf = 0;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * stride_x;
    const T* dyr = dy + row * stride_dy;
    const float mu = IS_RMS ? 0.f : mean[row];
    const float rs = rstd[row];
    float2 s = make_float2(0.f, 0.f);
#pragma unroll 4
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float xv[VEC], dyv[VEC], w[VEC];
      load_float<T, VEC>(xr + c * VEC, xv);
      load_float<T, VEC>(dyr + c * VEC, dyv);
      load_param<W, VEC>(weight, c, 1.f, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = dyv[j] * w[j];
        s.x += g * (xv[j] - mu) * rs;
        s.y += g;
      }
    }
    s = row_sum(s, red[buf]);
    buf ^= 1;
    if (threadIdx.x == 0) {
      dots[2 * row] = s.x / n;
      dots[2 * row + 1] = IS_RMS ? 0.f : s.y / n;
    }
  }
}

// Long-row backward, pass 2: block (j, s) owns chunk c = j * blockDim.x + threadIdx.x (VEC columns)
// of rows [s*M/G, (s+1)*M/G) (G = gridDim.y), with (c1, c2) = dots of each row:
//   dx = rstd * (g - xhat * c1 - c2) + dh,   part_dw[s] = sum of dy * xhat,   part_db[s] = sum of dy
// The partials stay in registers and are written once; the next row's x and dy are loaded
// (register double buffer) before this row is computed.
template <typename T, typename W, bool IS_RMS, int VEC>
__global__ void __launch_bounds__(kDxThreads)
    layer_norm_bwd_dx_kernel(const T* dy, const T* dh, const T* x, const W* __restrict__ weight,
                             const float* __restrict__ mean, const float* __restrict__ rstd,
                             const float* __restrict__ dots, T* dx, float* __restrict__ part_dw,
                             float* __restrict__ part_db, int64_t M, int64_t N, int64_t stride_dy, int64_t stride_dh,
                             int64_t stride_x, int64_t stride_dx) {
  const int64_t chunks = N / VEC;
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  const int64_t slot = blockIdx.y;
  const int64_t row_begin = slot * M / gridDim.y;
  const int64_t row_end = (slot + 1) * M / gridDim.y;
  float w[VEC], pdw[VEC], pdb[VEC], xv[VEC], dyv[VEC];
  load_param<W, VEC>(weight, c, 1.f, w);
#pragma unroll
  for (int j = 0; j < VEC; ++j) pdw[j] = pdb[j] = 0.f;
  if (row_begin < row_end) {
    load_float<T, VEC>(x + row_begin * stride_x + c * VEC, xv);
    load_float<T, VEC>(dy + row_begin * stride_dy + c * VEC, dyv);
  }
  for (int64_t row = row_begin; row < row_end; ++row) {
    float xn[VEC], dyn[VEC], d[VEC], out[VEC];
    if (row + 1 < row_end) {
      load_float<T, VEC>(x + (row + 1) * stride_x + c * VEC, xn);
      load_float<T, VEC>(dy + (row + 1) * stride_dy + c * VEC, dyn);
    }
    if (dh != nullptr) {
      load_float<T, VEC>(dh + row * stride_dh + c * VEC, d);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) d[j] = 0.f;
    }
    const float mu = IS_RMS ? 0.f : mean[row];
    const float rs = rstd[row];
    const float c1 = dots[2 * row], c2 = dots[2 * row + 1];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xhat = (xv[j] - mu) * rs;
      out[j] = rs * (dyv[j] * w[j] - xhat * c1 - c2) + d[j];
      pdw[j] += dyv[j] * xhat;
      pdb[j] += dyv[j];
    }
    store_float<T, VEC>(dx + row * stride_dx + c * VEC, out);
    if (row + 1 < row_end) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xv[j] = xn[j];
        dyv[j] = dyn[j];
      }
    }
  }
  if (part_dw != nullptr) store_float<float, VEC>(part_dw + slot * N + c * VEC, pdw);
  if (part_db != nullptr) store_float<float, VEC>(part_db + slot * N + c * VEC, pdb);
}

// Backward stage 2: dweight[n] = sum_{s < G} part_dw[s][n] (same for dbias), summed in a fixed
// order: thread (tx, ty) adds s = ty, ty + 16, ... for column 32 * blockIdx.x + tx, then ty == 0
// adds the 16 sums in ty order.
constexpr int kReduceCols = 32;
constexpr int kReduceLanes = 16;

template <typename W>
__global__ void __launch_bounds__(kReduceCols* kReduceLanes)
    layer_norm_bwd_reduce_kernel(const float* __restrict__ part_dw, const float* __restrict__ part_db,
                                 W* __restrict__ dweight, W* __restrict__ dbias, int64_t G, int64_t N) {
  __shared__ float sums[2][kReduceLanes][kReduceCols + 1];
  const int64_t col = (int64_t)blockIdx.x * kReduceCols + threadIdx.x;
  float sw = 0.f, sb = 0.f;
  if (col < N) {
    for (int64_t s = threadIdx.y; s < G; s += kReduceLanes) {
      if (dweight != nullptr) sw += part_dw[s * N + col];
      if (dbias != nullptr) sb += part_db[s * N + col];
    }
  }
  sums[0][threadIdx.y][threadIdx.x] = sw;
  sums[1][threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float tw = 0.f, tb = 0.f;
    for (int l = 0; l < kReduceLanes; ++l) {
      tw += sums[0][l][threadIdx.x];
      tb += sums[1][l][threadIdx.x];
    }
    if (dweight != nullptr) dweight[col] = from_float<W>(tw);
    if (dbias != nullptr) dbias[col] = from_float<W>(tb);
  }
}

// Launch shape for rows of N elements: the fewest threads per row (32..512, a power of two) that
// cover the row in one tile of `elems` values per thread, then enough rows per block to reach
// kRowsThreads threads.
struct RowPlan {
  int vec;
  int threads_per_row;
  int rows_per_block;
  int64_t tiles;
};

inline RowPlan plan_rows(int64_t N, int vec, int elems) {
  RowPlan p;
  p.vec = vec;
  const int64_t chunks = N / vec;
  const int64_t per_thread = elems / vec;
  p.threads_per_row = 32;
  while (p.threads_per_row < kMaxThreads && (int64_t)p.threads_per_row * per_thread < chunks) p.threads_per_row *= 2;
  p.tiles = ceil_div(chunks, (int64_t)p.threads_per_row * per_thread);
  p.rows_per_block = max_of(1, kRowsThreads / p.threads_per_row);
  return p;
}

// True when every row start of p (rows `stride` elements apart) is 16-byte aligned.
inline bool rows_aligned(uintptr_t p, int64_t stride, int64_t M, int vec) {
  return p == 0 || (aligned_to(p, 16) && (M == 1 || stride % vec == 0));
}

// Backward stage-1 blocks: a wave of about 1024 threads per SM, never more than M (every block owns
// at least one row) nor 4 per SM (the workspace bound; blocks have at least kRowsThreads threads).
inline int64_t bwd_blocks(int64_t M, int block_threads, int sms) {
  const int64_t per_sm = max_of(1, 1024 / block_threads);
  return min_of(M, (int64_t)sms * min_of<int64_t>(per_sm, 1024 / kRowsThreads));
}

inline int64_t bwd_blocks_bound(int64_t M, int sms) { return min_of(M, (int64_t)sms * (1024 / kRowsThreads)); }

// Floats of the workspace's leading (c1, c2) row dots of the long-row backward (16-byte multiple).
inline int64_t dots_floats(int64_t M) { return ceil_div<int64_t>(2 * M, 4) * 4; }

// Row groups of the long-row pass 2 (grid y): about 2 blocks per SM over all column blocks,
// within M and bwd_blocks_bound (the workspace's partial rows).
inline int64_t dx_groups(int64_t M, int64_t col_blocks, int sms) {
  return max_of<int64_t>(1, min_of<int64_t>(M, ceil_div<int64_t>(2 * (int64_t)sms, col_blocks)));
}

}  // namespace

int layer_norm_fwd(uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t h,
                   uintptr_t mean, uintptr_t rstd, int64_t M, int64_t N, int64_t stride_x, int64_t stride_r,
                   int64_t stride_y, int64_t stride_h, double eps, bool is_rms, int x_dtype, int w_dtype,
                   uintptr_t stream) {
  if (M < 0 || N < 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (x == 0 || y == 0) return cudaErrorInvalidValue;
  if (stride_x < 0 || stride_r < 0) return cudaErrorInvalidValue;
  if (M > 1 && (stride_y < N || (h != 0 && stride_h < N))) return cudaErrorInvalidValue;

  return dispatch_input_weight(x_dtype, w_dtype, [&](auto xt, auto wt) -> int {
    using T = typename decltype(xt)::type;
    using W = typename decltype(wt)::type;
    constexpr int V = kMaxVec<T>;
    const bool vec_ok = N % V == 0 && rows_aligned(x, stride_x, M, V) && rows_aligned(residual, stride_r, M, V) &&
                        rows_aligned(y, stride_y, M, V) && rows_aligned(h, stride_h, M, V) &&
                        aligned_to(weight, 16) && aligned_to(bias, 16);
    const RowPlan p = plan_rows(N, vec_ok ? V : 1, vec_ok ? fwd_elems<T, V>() : fwd_elems<T, 1>());
    const int64_t blocks = min_of<int64_t>(ceil_div(M, (int64_t)p.rows_per_block), INT32_MAX);
    const dim3 grid(static_cast<unsigned>(blocks));
    const dim3 block(p.threads_per_row, p.rows_per_block);
    return dispatch_bool(is_rms, [&](auto rms) -> int {
      constexpr bool IS_RMS = decltype(rms)::value;
      return dispatch_bool(vec_ok, [&](auto vec) -> int {
        constexpr int VEC = decltype(vec)::value ? V : 1;
        return launch(layer_norm_fwd_kernel<T, W, IS_RMS, VEC>, grid, block, reinterpret_cast<cudaStream_t>(stream),
                      reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(residual),
                      reinterpret_cast<const W*>(weight), reinterpret_cast<const W*>(bias), reinterpret_cast<T*>(y),
                      reinterpret_cast<T*>(h), reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd), M, N,
                      stride_x, stride_r, stride_y, stride_h, static_cast<float>(eps));
      });
    });
  });
}

#if defined(FASTLM_HOST_EMULATION)
std::vector<int64_t> layer_norm_fwd_host_loads() {
  std::vector<int64_t> out(g_fwd_loads, g_fwd_loads + 2);
  g_fwd_loads[0] = g_fwd_loads[1] = 0;
  return out;
}
#endif

int64_t layer_norm_bwd_workspace_size(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 0;
  int sms = 0;
  if (current_sm_count(&sms) != cudaSuccess || sms <= 0) return -1;
  return (dots_floats(M) + bwd_blocks_bound(M, sms) * 2 * N) * static_cast<int64_t>(sizeof(float));
}

int layer_norm_bwd(uintptr_t dy, uintptr_t dh, uintptr_t x, uintptr_t weight, uintptr_t mean, uintptr_t rstd,
                   uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t workspace, int64_t M, int64_t N,
                   int64_t stride_dy, int64_t stride_dh, int64_t stride_x, int64_t stride_dx, bool is_rms,
                   int x_dtype, int w_dtype, uintptr_t stream) {
  if (M < 0 || N < 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (dy == 0 || x == 0 || rstd == 0 || dx == 0 || (!is_rms && mean == 0)) return cudaErrorInvalidValue;
  if ((dweight != 0 || dbias != 0) && workspace == 0) return cudaErrorInvalidValue;
  if (stride_dy < 0 || stride_dh < 0 || stride_x < 0) return cudaErrorInvalidValue;
  if (M > 1 && stride_dx < N) return cudaErrorInvalidValue;

  int sms = 0;
  cudaError_t err = current_sm_count(&sms);
  if (err != cudaSuccess) return err;
  if (sms <= 0) return cudaErrorInvalidDevice;

  return dispatch_input_weight(x_dtype, w_dtype, [&](auto xt, auto wt) -> int {
    using T = typename decltype(xt)::type;
    using W = typename decltype(wt)::type;
    constexpr int V = kMaxVec<T>;
    const bool vec_ok = N % V == 0 && rows_aligned(dy, stride_dy, M, V) && rows_aligned(dh, stride_dh, M, V) &&
                        rows_aligned(x, stride_x, M, V) && rows_aligned(dx, stride_dx, M, V) &&
                        aligned_to(weight, 16) && aligned_to(workspace, 16);
    const RowPlan p = plan_rows(N, vec_ok ? V : 1, vec_ok ? bwd_elems<T, V>() : bwd_elems<T, 1>());
    const bool long_rows = p.tiles > 1;
    if (long_rows && workspace == 0) return cudaErrorInvalidValue;
    const int64_t col_blocks = ceil_div<int64_t>(N / p.vec, kDxThreads);
    const int64_t blocks = long_rows ? dx_groups(M, col_blocks, sms) : bwd_blocks(M, p.threads_per_row * p.rows_per_block, sms);
    if (blocks > bwd_blocks_bound(M, sms) || col_blocks > INT32_MAX) return cudaErrorInvalidValue;
    float* dots = reinterpret_cast<float*>(workspace);
    float* part_dw = dweight != 0 ? dots + dots_floats(M) : nullptr;
    float* part_db = dbias != 0 ? dots + dots_floats(M) + blocks * N : nullptr;
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

    const int code = dispatch_bool(is_rms, [&](auto rms) -> int {
      constexpr bool IS_RMS = decltype(rms)::value;
      return dispatch_bool(vec_ok, [&](auto vec) -> int {
        constexpr int VEC = decltype(vec)::value ? V : 1;
        if (long_rows) {
          const int e = launch(layer_norm_bwd_dots_kernel<T, W, IS_RMS, VEC>,
                               dim3(static_cast<unsigned>(min_of<int64_t>(M, INT32_MAX))), dim3(p.threads_per_row), s,
                               reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(x),
                               reinterpret_cast<const W*>(weight), reinterpret_cast<const float*>(mean),
                               reinterpret_cast<const float*>(rstd), dots, M, N, stride_dy, stride_x);
          if (e != cudaSuccess) return e;
          return launch(layer_norm_bwd_dx_kernel<T, W, IS_RMS, VEC>,
                        dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(blocks)), dim3(kDxThreads), s,
                        reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(dh), reinterpret_cast<const T*>(x),
                        reinterpret_cast<const W*>(weight), reinterpret_cast<const float*>(mean),
                        reinterpret_cast<const float*>(rstd), static_cast<const float*>(dots),
                        reinterpret_cast<T*>(dx), part_dw, part_db, M, N, stride_dy, stride_dh, stride_x, stride_dx);
        }
        return launch(layer_norm_bwd_kernel<T, W, IS_RMS, VEC>, dim3(static_cast<unsigned>(blocks)),
                      dim3(p.threads_per_row, p.rows_per_block), s, reinterpret_cast<const T*>(dy),
                      reinterpret_cast<const T*>(dh), reinterpret_cast<const T*>(x),
                      reinterpret_cast<const W*>(weight), reinterpret_cast<const float*>(mean),
                      reinterpret_cast<const float*>(rstd), reinterpret_cast<T*>(dx), part_dw, part_db, M, N,
                      stride_dy, stride_dh, stride_x, stride_dx);
      });
    });
    if (code != cudaSuccess || (dweight == 0 && dbias == 0)) return code;
    return launch(layer_norm_bwd_reduce_kernel<W>, dim3(static_cast<unsigned>(ceil_div<int64_t>(N, kReduceCols))),
                  dim3(kReduceCols, kReduceLanes), s, part_dw, part_db, reinterpret_cast<W*>(dweight),
                  reinterpret_cast<W*>(dbias), blocks, N);
  });
}

}  // namespace fastlm
