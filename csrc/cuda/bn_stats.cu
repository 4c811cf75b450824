// Batch statistics and the small per-channel BatchNorm ops: ext_bn_stats,
// ext_bn_finalize, ext_bn_update_running_stats.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "common.h"
#include "common.cuh"

namespace fusedres {
namespace cuda {
namespace {

// The shift of the shifted sums: the channel's first value, or 0 when it is not finite (then
// the plain sums give the reference's inf mean and NaN variance).
template <typename T>
__device__ __forceinline__ T stats_shift(T v) {
  return isfinite(v) ? v : T(0);
}

// Per block, per channel: s1 = sum(y - K), s2 = sum((y - K)^2) over the block's rows, K the
// channel's shift. Shifting by a sample of the channel keeps s2 / n - (s1 / n)^2 free of
// the catastrophic cancellation of E[y^2] - E[y]^2 when |mean| >> std.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads, kReduceMinBlocks<scalar_t>)
    bn_stats_partial_kernel(const scalar_t* __restrict__ y, int64_t M, int64_t C, int gx_shift,
                            acc_type<scalar_t>* __restrict__ ws) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t smem[kGroup * kThreads];
  const RowLanes t(gx_shift, C);
  acc_t s1[kGroup] = {}, s2[kGroup] = {};
  if (t.valid > 0) {
    acc_t shift[kGroup];
    load8<kVec>(y + t.c0, t.valid, shift);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) shift[k] = stats_shift(shift[k]);
#pragma unroll 4
    for (int64_t row = t.row0; row < M; row += t.row_step) {
      acc_t v[kGroup];
      load8<kVec>(y + row * C + t.c0, t.valid, v);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const acc_t d = v[k] - shift[k];
        s1[k] += d;
        s2[k] += d * d;
      }
    }
  }
  store_partials(s1, smem, t, ws, 0, C);
  store_partials(s2, smem, t, ws, 1, C);
}

// mean = K + S1 / n, var = S2 / n - (S1 / n)^2 (clamped at 0, NaN kept), in double.
template <typename scalar_t>
struct StatsEpilogue {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* y;  // row 0 holds the shifts
  double rows;
  acc_t* mean;
  acc_t* var;

  __device__ void operator()(int64_t c, const double (&s)[2]) const {
    const double shift = stats_shift(static_cast<acc_t>(y[c]));
    const double d = s[0] / rows;
    const double v = s[1] / rows - d * d;
    mean[c] = static_cast<acc_t>(shift + d);
    var[c] = static_cast<acc_t>(v < 0 ? 0.0 : v);
  }
};

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& y_in) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const Activation y = prepare_activation(y_in, at::MemoryFormat::ChannelsLast, "ext_bn_stats", "y");
  const int64_t M = y.layout.outer, C = y.layout.channels;
  const auto opts = y.t.options().dtype(y.acc);
  at::Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts);
  if (C == 0) return {mean, var};
  if (M == 0) {  // as torch.mean of nothing
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const RowSplit split = row_split(M, C);
  const at::Tensor ws = at::empty({2, int64_t{split.grid.y}, C}, opts);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, y.t.scalar_type(), "ext_bn_stats",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* yp = y.t.data_ptr<scalar_t>();
    if (C % kGroup == 0 && aligned16(yp)) {
      bn_stats_partial_kernel<scalar_t, true>
          <<<split.grid, kThreads, 0, stream>>>(yp, M, C, split.gx_shift, ws.data_ptr<acc_t>());
    } else {
      bn_stats_partial_kernel<scalar_t, false>
          <<<split.grid, kThreads, 0, stream>>>(yp, M, C, split.gx_shift, ws.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    combine_partials<2, acc_t>(
        ws, StatsEpilogue<scalar_t>{yp, static_cast<double>(M), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>()},
        stream);
  });
  return {mean, var};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bn_finalize_kernel(const T* __restrict__ mean, const T* __restrict__ var, const T* __restrict__ weight,
                       const T* __restrict__ bias, T eps, T* __restrict__ scale, T* __restrict__ shift, int64_t C) {
  for (int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; c < C; c += int64_t{gridDim.x} * blockDim.x) {
    T s = rsqrt(var[c] + eps);
    if (weight != nullptr) s *= weight[c];
    T b = -mean[c] * s;
    if (bias != nullptr) b += bias[c];
    scale[c] = s;
    shift[c] = b;
  }
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cuda(const at::Tensor& mean_in, const at::Tensor& var_in,
                                                    const std::optional<at::Tensor>& weight_in,
                                                    const std::optional<at::Tensor>& bias_in, double eps) {
  const char* op = "ext_bn_finalize";
  check_stats(mean_in, var_in, op);
  const c10::cuda::CUDAGuard guard(mean_in.device());
  const int64_t C = mean_in.numel();
  const at::ScalarType acc = mean_in.scalar_type();
  const at::Tensor mean = mean_in.contiguous(), var = var_in.contiguous();
  const auto weight = per_channel(weight_in, C, acc, mean.device(), op, "weight");
  const auto bias = per_channel(bias_in, C, acc, mean.device(), op, "bias");
  at::Tensor scale = at::empty({C}, mean.options()), shift = at::empty({C}, mean.options());
  if (C == 0) return {scale, shift};
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((C + kThreads - 1) / kThreads, 1024));
  AT_DISPATCH_FLOATING_TYPES(acc, "ext_bn_finalize", [&] {
    bn_finalize_kernel<scalar_t><<<blocks, kThreads, 0, current_stream()>>>(
        mean.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(), data_or_null<scalar_t>(weight),
        data_or_null<scalar_t>(bias), static_cast<scalar_t>(eps), scale.data_ptr<scalar_t>(),
        shift.data_ptr<scalar_t>(), C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scale, shift};
}

// One block, so that the increment of num_batches_tracked is ordered with its reads: every
// thread reads the old value, then thread 0 writes the new one.
template <typename stat_t, typename T>
__global__ void __launch_bounds__(kThreads)
    update_running_stats_kernel(stat_t* __restrict__ running_mean, stat_t* __restrict__ running_var,
                                int64_t* __restrict__ num_batches_tracked, const T* __restrict__ mean,
                                const T* __restrict__ var, int64_t C, bool has_momentum, T momentum,
                                T correction) {
  const int64_t batches = *num_batches_tracked + 1;
  const T f = has_momentum ? momentum : static_cast<T>(1.0 / static_cast<double>(batches));
  __syncthreads();
  if (threadIdx.x == 0) *num_batches_tracked = batches;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    running_mean[c] = static_cast<stat_t>((T(1) - f) * static_cast<T>(running_mean[c]) + f * mean[c]);
    running_var[c] = static_cast<stat_t>((T(1) - f) * static_cast<T>(running_var[c]) + f * (var[c] * correction));
  }
}

void bn_update_running_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                                  const at::Tensor& num_batches_tracked, const at::Tensor& mean_in,
                                  const at::Tensor& var_in, std::optional<double> momentum, int64_t count) {
  const RunningStatsArgs a =
      prepare_running_stats_and_bump_versions(running_mean, running_var, num_batches_tracked, mean_in, var_in, count);
  const c10::cuda::CUDAGuard guard(a.mean.device());
  const int64_t C = a.mean.numel();
  // count / (count - 1) in double, as Python computes it before scaling var.
  const double correction = static_cast<double>(count) / static_cast<double>(count - 1);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(a.mean.scalar_type(), "ext_bn_update_running_stats", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, running_mean.scalar_type(),
                                    "ext_bn_update_running_stats", [&] {
      update_running_stats_kernel<scalar_t, acc_t><<<1, kThreads, 0, stream>>>(
          running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(),
          num_batches_tracked.data_ptr<int64_t>(), a.mean.data_ptr<acc_t>(), a.var.data_ptr<acc_t>(), C,
          momentum.has_value(), static_cast<acc_t>(momentum.value_or(0.0)), static_cast<acc_t>(correction));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("ext_bn_stats", &fusedres::cuda::bn_stats_cuda);
  m.impl("ext_bn_finalize", &fusedres::cuda::bn_finalize_cuda);
  m.impl("ext_bn_update_running_stats", &fusedres::cuda::bn_update_running_stats_cuda);
}
