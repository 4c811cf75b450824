// A BatchNorm applied to a conv input and the elementwise parts of the train-mode conv's
// backward: ext_prologue, ext_prologue_backward, ext_conv_bn_stats_grad_y.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "common.cuh"

namespace fusedres {
namespace cuda {
namespace {

// a = relu?(x * scale + shift).
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    prologue_kernel(const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ scale,
                    const acc_type<scalar_t>* __restrict__ shift, scalar_t* __restrict__ out, int64_t numel,
                    int64_t C, bool relu) {
  using acc_t = acc_type<scalar_t>;
  for (FlatGroups it(numel, C); it.more(); it.next()) {
    const int64_t base = it.base();
    const int valid = it.valid();
    acc_t v[kGroup], s[kGroup], b[kGroup];
    load8<kVec>(x + base, valid, v);
    load_channels8<kVec>(scale, it.c0, C, s);
    load_channels8<kVec>(shift, it.c0, C, b);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      v[k] = v[k] * s[k] + b[k];
      if (relu) v[k] = relu_keep_nan(v[k]);
    }
    store8<kVec>(out + base, valid, v);
  }
}

at::Tensor prologue_cuda(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& shift_in, bool relu) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PrologueArgs a = prepare_prologue(std::nullopt, x_in, scale_in, shift_in, at::MemoryFormat::ChannelsLast);
  const int64_t numel = a.x.layout.numel(), C = a.x.layout.channels;
  at::Tensor out = empty_activation(a.x.t);
  if (numel == 0) return restore(out, a.x);
  const at::Tensor scale = aligned_channels(a.scale), shift = aligned_channels(a.shift);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, a.x.t.scalar_type(),
                                  "ext_prologue", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = a.x.t.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool vec = C % kGroup == 0 && aligned16(xp) && aligned16(op);
    const auto kernel = vec ? prologue_kernel<scalar_t, true> : prologue_kernel<scalar_t, false>;
    kernel<<<flat_blocks(numel), kThreads, 0, current_stream()>>>(
        xp, scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(), op, numel, C, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return restore(out, a.x);
}

// Recomputes p = x * scale + shift; g = grad_a, 0 where relu and p <= 0 (a NaN p passes);
// dx = g * scale when dx != nullptr; block partials of sum g * x (q = 0) and sum g (q = 1).
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads, kReduceMinBlocks<scalar_t>) prologue_backward_kernel(
    const scalar_t* __restrict__ grad_a, const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ scale,
    const acc_type<scalar_t>* __restrict__ shift, bool relu, scalar_t* __restrict__ dx, int64_t M, int64_t C,
    int gx_shift, acc_type<scalar_t>* __restrict__ ws) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t smem[kGroup * kThreads];
  const RowLanes t(gx_shift, C);
  acc_t sgx[kGroup] = {}, sg[kGroup] = {};
  if (t.valid > 0) {
    acc_t s[kGroup], b[kGroup];
    load8<false>(scale + t.c0, t.valid, s);
    load8<false>(shift + t.c0, t.valid, b);
    for (int64_t row = t.row0; row < M; row += t.row_step) {
      const int64_t off = row * C + t.c0;
      acc_t g[kGroup], v[kGroup];
      load8<kVec>(grad_a + off, t.valid, g);
      load8<kVec>(x + off, t.valid, v);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        if (relu && v[k] * s[k] + b[k] <= acc_t(0)) g[k] = acc_t(0);
        sgx[k] += g[k] * v[k];
        sg[k] += g[k];
      }
      if (dx != nullptr) {
#pragma unroll
        for (int k = 0; k < kGroup; ++k) v[k] = g[k] * s[k];
        store8<kVec>(dx + off, t.valid, v);
      }
    }
  }
  store_partials(sgx, smem, t, ws, 0, C);
  store_partials(sg, smem, t, ws, 1, C);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prologue_backward_cuda(const at::Tensor& grad_a_in,
                                                                      const at::Tensor& x_in,
                                                                      const at::Tensor& scale_in,
                                                                      const at::Tensor& shift_in, bool relu,
                                                                      bool need_dx) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PrologueArgs a = prepare_prologue(grad_a_in, x_in, scale_in, shift_in, at::MemoryFormat::ChannelsLast);
  const int64_t M = a.x.layout.outer, C = a.x.layout.channels;
  const auto acc_opts = a.x.t.options().dtype(a.x.acc);
  at::Tensor dx = need_dx ? empty_activation(a.x.t) : empty_output(a.x.t);
  at::Tensor dscale = at::empty({C}, acc_opts), dshift = at::empty({C}, acc_opts);
  if (M * C == 0) {  // no elements: the sums are 0
    dscale.zero_();
    dshift.zero_();
  } else {
    const RowSplit split = row_split(M, C);
    const at::Tensor ws = at::empty({2, int64_t{split.grid.y}, C}, acc_opts);
    const cudaStream_t stream = current_stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, a.x.t.scalar_type(),
                                    "ext_prologue_backward", [&] {
      using acc_t = acc_type<scalar_t>;
      const scalar_t* gp = a.grad_a->data_ptr<scalar_t>();
      const scalar_t* xp = a.x.t.data_ptr<scalar_t>();
      scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
      const bool vec = C % kGroup == 0 && aligned16(gp) && aligned16(xp) && (dxp == nullptr || aligned16(dxp));
      const auto kernel = vec ? prologue_backward_kernel<scalar_t, true> : prologue_backward_kernel<scalar_t, false>;
      kernel<<<split.grid, kThreads, 0, stream>>>(gp, xp, a.scale.data_ptr<acc_t>(), a.shift.data_ptr<acc_t>(), relu,
                                                  dxp, M, C, split.gx_shift, ws.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      combine_partials<2, acc_t>(ws, StoreSums<acc_t, 2>{{dscale.data_ptr<acc_t>(), dshift.data_ptr<acc_t>()}},
                                 stream);
    });
  }
  if (need_dx) dx = restore(dx, a.x);
  return {dx, dscale, dshift};
}

// IEEE division also under --use_fast_math: grad_mean / count as the reference computes it.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return a / b; }

// out = (grad_y or 0) + grad_mean[c] / count + (y - mean[c]) * grad_var[c] * (2 / count);
// absent terms (null pointers) add nothing.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads) conv_bn_stats_grad_y_kernel(
    const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ y, const acc_type<scalar_t>* __restrict__ mean,
    const acc_type<scalar_t>* __restrict__ grad_mean, const acc_type<scalar_t>* __restrict__ grad_var,
    acc_type<scalar_t> count, acc_type<scalar_t> two_over_count, scalar_t* __restrict__ out, int64_t numel,
    int64_t C) {
  using acc_t = acc_type<scalar_t>;
  for (FlatGroups it(numel, C); it.more(); it.next()) {
    const int64_t base = it.base();
    const int valid = it.valid();
    acc_t g[kGroup] = {};
    if (grad_y != nullptr) load8<kVec>(grad_y + base, valid, g);
    if (grad_mean != nullptr) {
      acc_t gm[kGroup];
      load_channels8<kVec>(grad_mean, it.c0, C, gm);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) g[k] += div_rn(gm[k], count);
    }
    if (grad_var != nullptr) {
      acc_t v[kGroup], m[kGroup], gv[kGroup];
      load8<kVec>(y + base, valid, v);
      load_channels8<kVec>(mean, it.c0, C, m);
      load_channels8<kVec>(grad_var, it.c0, C, gv);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) g[k] += (v[k] - m[k]) * gv[k] * two_over_count;
    }
    store8<kVec>(out + base, valid, g);
  }
}

at::Tensor conv_bn_stats_grad_y_cuda(const std::optional<at::Tensor>& grad_y_in, const at::Tensor& y_in,
                                     const at::Tensor& mean_in, const std::optional<at::Tensor>& grad_mean_in,
                                     const std::optional<at::Tensor>& grad_var_in) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const GradYArgs a =
      prepare_grad_y(grad_y_in, y_in, mean_in, grad_mean_in, grad_var_in, at::MemoryFormat::ChannelsLast);
  const int64_t numel = a.y.layout.numel(), C = a.y.layout.channels;
  at::Tensor out = empty_activation(a.y.t);
  if (numel == 0) return restore(out, a.y);
  const at::Tensor mean = aligned_channels(a.mean);
  const auto grad_mean = aligned_channels(a.grad_mean), grad_var = aligned_channels(a.grad_var);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, a.y.t.scalar_type(),
                                  "ext_conv_bn_stats_grad_y", [&] {
    using acc_t = acc_type<scalar_t>;
    // count and 2 / count in the accumulation dtype, as the reference's 0-d count tensor.
    const acc_t count = static_cast<acc_t>(a.y.layout.outer);
    const acc_t two_over_count = acc_t(2) / count;
    const scalar_t* gp = data_or_null<scalar_t>(a.grad_y);
    const scalar_t* yp = a.y.t.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool vec = C % kGroup == 0 && aligned16(yp) && aligned16(op) && (gp == nullptr || aligned16(gp));
    const auto kernel =
        vec ? conv_bn_stats_grad_y_kernel<scalar_t, true> : conv_bn_stats_grad_y_kernel<scalar_t, false>;
    kernel<<<flat_blocks(numel), kThreads, 0, current_stream()>>>(
        gp, yp, mean.data_ptr<acc_t>(), data_or_null<acc_t>(grad_mean), data_or_null<acc_t>(grad_var), count,
        two_over_count, op, numel, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return restore(out, a.y);
}

}  // namespace
}  // namespace cuda
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("ext_prologue", &fusedres::cuda::prologue_cuda);
  m.impl("ext_prologue_backward", &fusedres::cuda::prologue_backward_cuda);
  m.impl("ext_conv_bn_stats_grad_y", &fusedres::cuda::conv_bn_stats_grad_y_cuda);
}
