// Device helpers shared by the CUDA kernels: 8-element loads/stores, the two work
// decompositions (flat groups for elementwise ops, channel groups x row lanes for per-channel
// reductions) and the deterministic reduction of per-block partials.
//
// Every activation is an [M = N*H*W, C] row-major matrix (channels_last). A thread's work
// unit is 8 consecutive elements. The vector path (C % 8 == 0, activation pointers 16-byte
// aligned) reads and writes them with 16-byte accesses; the scalar path checks bounds.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common.h"

namespace fusedres {
namespace cuda {

constexpr int kThreads = 256;  // the block size of every kernel
constexpr int kGroup = 8;      // elements per work unit: 16 bytes of half/bfloat16

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float, or double for double

// ---- Host side.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h (getCurrentDeviceProperties) includes
// cusparse.h and cublas_v2.h, which a minimal CUDA toolkit lacks.

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline int64_t device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// A per-channel vector with 16-byte aligned data (a copy when a view is not), so that the
// flat kernels' vector path can read 8 channels at once.
inline at::Tensor aligned_channels(const at::Tensor& t) { return aligned16(t.data_ptr()) ? t : t.clone(); }

inline std::optional<at::Tensor> aligned_channels(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return aligned_channels(*t);
}

// An uninitialised activation like y (contiguous channels_last, y's dtype).
inline at::Tensor empty_activation(const at::Tensor& y) {
  return at::empty(y.sizes(), y.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// Blocks of a flat elementwise kernel over `numel` elements: one group of 8 per thread,
// capped at what the SMs' thread slots hold (the kernels loop with a grid stride).
inline unsigned flat_blocks(int64_t numel) {
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  const int64_t wave = device_attribute(cudaDevAttrMultiProcessorCount) *
                       (device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor) / kThreads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min((groups + kThreads - 1) / kThreads, wave)));
}

// The grid of a per-channel reduction over an [M, C] activation. A block is
// (1 << gx_shift) groups of 8 channels x (256 >> gx_shift) row lanes; grid.x covers the
// channels, grid.y splits the rows so that the grid is about 4 blocks per SM while every
// thread keeps a few rows (the block's final reduction is then a small part of its work).
struct RowSplit {
  dim3 grid;
  int gx_shift;
};

inline RowSplit row_split(int64_t rows, int64_t channels) {
  constexpr int64_t kMinRowsPerThread = 4;
  const int64_t groups = (channels + kGroup - 1) / kGroup;
  int gx_shift = 0;
  while ((int64_t{1} << gx_shift) < groups && gx_shift < 5) ++gx_shift;
  const int64_t lanes = kThreads >> gx_shift;
  const int64_t grid_x = (groups + (int64_t{1} << gx_shift) - 1) >> gx_shift;
  TORCH_CHECK(grid_x <= INT32_MAX, "fusedres: too many channels (", channels, ")");
  int64_t grid_y = (4 * device_attribute(cudaDevAttrMultiProcessorCount) + grid_x - 1) / grid_x;
  grid_y = std::min(grid_y, rows / (lanes * kMinRowsPerThread));
  grid_y = std::max<int64_t>(1, std::min<int64_t>(grid_y, 65535));
  return {dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), gx_shift};
}

// ---- Device side.

// Minimum resident blocks per SM of the reduction kernels (their __launch_bounds__): the 4
// of row_split's grid, 2 with double accumulators (twice the registers).
template <typename scalar_t>
constexpr int kReduceMinBlocks = sizeof(acc_type<scalar_t>) == 8 ? 2 : 4;

// 8 consecutive elements in one aligned access: one uint4 for half/bfloat16, two for
// float, four for double.
template <typename T>
struct alignas(16) Pack8 {
  T v[kGroup];
};

// v = p[0..8) converted to T. Vector path: one aligned access. Scalar path: only the first
// `valid` elements are read, the others are 0.
template <bool kVec, typename scalar_t, typename T>
__device__ __forceinline__ void load8(const scalar_t* __restrict__ p, int valid, T (&v)[kGroup]) {
  if constexpr (kVec) {
    const Pack8<scalar_t> pack = *reinterpret_cast<const Pack8<scalar_t>*>(p);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = static_cast<T>(pack.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = k < valid ? static_cast<T>(p[k]) : T(0);
  }
}

// p[0..8) = v converted to scalar_t (only the first `valid` in the scalar path).
template <bool kVec, typename scalar_t, typename T>
__device__ __forceinline__ void store8(scalar_t* __restrict__ p, int valid, const T (&v)[kGroup]) {
  if constexpr (kVec) {
    Pack8<scalar_t> pack;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) pack.v[k] = static_cast<scalar_t>(v[k]);
    *reinterpret_cast<Pack8<scalar_t>*>(p) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k)
      if (k < valid) p[k] = static_cast<scalar_t>(v[k]);
  }
}

// The per-channel values of a flat group whose first element has channel c0. Vector path:
// p[c0..c0+8) (C % 8 == 0 and p aligned). Scalar path: channel by channel, wrapping at C
// (a group may span rows; every index read is < C).
template <bool kVec, typename T>
__device__ __forceinline__ void load_channels8(const T* __restrict__ p, int64_t c0, int64_t C, T (&v)[kGroup]) {
  if constexpr (kVec) {
    load8<true>(p + c0, kGroup, v);
  } else {
    int64_t c = c0;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      v[k] = p[c];
      if (++c == C) c = 0;
    }
  }
}

// torch.relu: NaN passes.
template <typename T>
__device__ __forceinline__ T relu_keep_nan(T v) {
  return v > T(0) ? v : (v != v ? v : T(0));
}

// Grid-stride walk over the flat groups g of 8 elements [8g, 8g + 8) of an [M, C]
// activation of `numel` elements. c0 = 8g % C, the channel of the group's first element,
// is advanced incrementally (no 64-bit division per group).
struct FlatGroups {
  int64_t g, step, end, numel, C, c0, c_step;

  __device__ FlatGroups(int64_t numel_, int64_t channels)
      : g(int64_t{blockIdx.x} * blockDim.x + threadIdx.x),
        step(int64_t{gridDim.x} * blockDim.x),
        end((numel_ + kGroup - 1) / kGroup),
        numel(numel_),
        C(channels),
        c0(g * kGroup % channels),
        c_step(step * kGroup % channels) {}

  __device__ bool more() const { return g < end; }
  __device__ int64_t base() const { return g * kGroup; }
  // Elements of the group inside the tensor: 8 except in the last group of a scalar path.
  __device__ int valid() const { return static_cast<int>(std::min<int64_t>(kGroup, numel - base())); }
  __device__ void next() {
    g += step;
    c0 += c_step;
    if (c0 >= C) c0 -= C;
  }
};

// A thread's place in a per-channel reduction block (see row_split): threadIdx.x =
// lane * width + column, so that a warp reads consecutive channel groups of its rows. The
// thread owns channels [c0, c0 + valid) and the rows row0, row0 + row_step, ...
struct RowLanes {
  int width;  // channel groups per block
  int64_t c0;
  int valid;  // 0 to 8 (0: past the last channel)
  int64_t row0, row_step;

  __device__ RowLanes(int gx_shift, int64_t C)
      : width(1 << gx_shift),
        c0((int64_t{blockIdx.x} * width + (threadIdx.x & (width - 1))) * kGroup),
        valid(static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kGroup, C - c0)))),
        row0(int64_t{blockIdx.y} * (kThreads >> gx_shift) + (threadIdx.x >> gx_shift)),
        row_step(int64_t{gridDim.y} * (kThreads >> gx_shift)) {}
};

// Sums v over the lanes of a block laid out as threadIdx.x = lane * width + column, by a
// fixed tree (deterministic). The sums end in v of threads threadIdx.x < width (lane 0).
// smem holds N * kThreads values; the layout [n][thread] keeps the accesses conflict-free.
template <typename T, int N>
__device__ __forceinline__ void sum_lanes(T (&v)[N], T* smem, int width) {
  const int tid = threadIdx.x;
  __syncthreads();  // a previous call may still be reading smem
#pragma unroll
  for (int n = 0; n < N; ++n) smem[n * kThreads + tid] = v[n];
  __syncthreads();
  for (int half = kThreads / 2; half >= width; half >>= 1) {
    if (tid < half) {
#pragma unroll
      for (int n = 0; n < N; ++n) smem[n * kThreads + tid] += smem[n * kThreads + tid + half];
    }
    __syncthreads();
  }
  if (tid < width) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] = smem[n * kThreads + tid];
  }
}

// Block-reduces v over the row lanes and writes the block's partial sums of its channels to
// row (q, blockIdx.y) of the workspace [NQ, gridDim.y, C].
template <typename T>
__device__ __forceinline__ void store_partials(T (&v)[kGroup], T* smem, const RowLanes& t, T* __restrict__ ws, int q,
                                               int64_t C) {
  sum_lanes(v, smem, t.width);
  if (static_cast<int>(threadIdx.x) < t.width) {
    T* out = ws + (int64_t{q} * gridDim.y + blockIdx.y) * C + t.c0;
#pragma unroll
    for (int k = 0; k < kGroup; ++k)
      if (k < t.valid) out[k] = v[k];  // unrolled: v stays in registers
  }
}

// Second pass of a per-channel reduction: s[q] = sum over p of ws[q, p, c], in double, in a
// fixed order, then epilogue(c, s). A block is 8 channels x 32 lanes striding over the P
// partial rows: short serial chains per thread (P is a few hundred at most), and each row
// segment read is one 32-byte sector for float.
constexpr int kCombineShift = 3;  // log2 of the channels per combine block

template <int NQ, typename T, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    combine_partials_kernel(const T* __restrict__ ws, int64_t P, int64_t C, Epilogue epilogue) {
  constexpr int kWidth = 1 << kCombineShift;
  __shared__ double smem[NQ * kThreads];
  const int64_t c = int64_t{blockIdx.x} * kWidth + (threadIdx.x & (kWidth - 1));
  double s[NQ] = {};
  if (c < C) {
#pragma unroll 4
    for (int64_t p = threadIdx.x >> kCombineShift; p < P; p += kThreads >> kCombineShift) {
#pragma unroll
      for (int q = 0; q < NQ; ++q) s[q] += static_cast<double>(ws[(q * P + p) * C + c]);
    }
  }
  sum_lanes(s, smem, kWidth);
  if (static_cast<int>(threadIdx.x) < kWidth && c < C) epilogue(c, s);
}

template <int NQ, typename T, typename Epilogue>
void combine_partials(const at::Tensor& ws, const Epilogue& epilogue, cudaStream_t stream) {
  const int64_t P = ws.size(1), C = ws.size(2);
  const int64_t blocks = (C + (1 << kCombineShift) - 1) >> kCombineShift;
  combine_partials_kernel<NQ><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(ws.data_ptr<T>(), P, C,
                                                                                        epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Epilogue writing the sums, out[q][c] = s[q], in the accumulation dtype.
template <typename T, int NQ>
struct StoreSums {
  T* out[NQ];
  __device__ void operator()(int64_t c, const double (&s)[NQ]) const {
#pragma unroll
    for (int q = 0; q < NQ; ++q) out[q][c] = static_cast<T>(s[q]);
  }
};

}  // namespace cuda
}  // namespace fusedres
