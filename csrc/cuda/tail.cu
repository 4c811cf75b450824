// The block tail and its backward: ext_scale_bias_act, ext_scale_bias_act_backward.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common.h"
#include "common.cuh"

namespace fusedres {
namespace cuda {
namespace {

// out = relu?(y * scale + bias + r), r = residual * rscale + rbias, residual or 0. With
// relu (mask != nullptr) each thread also writes the mask byte of its group: bit k set
// when the stored output is not <= 0. A group starts at a multiple of 8, so its byte is
// its own (no races); bits past the last element stay 0.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kThreads) scale_bias_act_kernel(
    const scalar_t* __restrict__ y, const acc_type<scalar_t>* __restrict__ scale,
    const acc_type<scalar_t>* __restrict__ bias, const scalar_t* __restrict__ residual,
    const acc_type<scalar_t>* __restrict__ rscale, const acc_type<scalar_t>* __restrict__ rbias,
    scalar_t* __restrict__ out, uint8_t* __restrict__ mask, int64_t numel, int64_t C) {
  using acc_t = acc_type<scalar_t>;
  for (FlatGroups it(numel, C); it.more(); it.next()) {
    const int64_t base = it.base();
    const int valid = it.valid();
    acc_t v[kGroup], a[kGroup], b[kGroup];
    load8<kVec>(y + base, valid, v);
    load_channels8<kVec>(scale, it.c0, C, a);
    load_channels8<kVec>(bias, it.c0, C, b);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) v[k] = v[k] * a[k] + b[k];
    if (residual != nullptr) {
      acc_t r[kGroup];
      load8<kVec>(residual + base, valid, r);
      if (rscale != nullptr) {
        load_channels8<kVec>(rscale, it.c0, C, a);
        load_channels8<kVec>(rbias, it.c0, C, b);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) r[k] = r[k] * a[k] + b[k];
      }
#pragma unroll
      for (int k = 0; k < kGroup; ++k) v[k] += r[k];
    }
    scalar_t o[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) o[k] = static_cast<scalar_t>(mask != nullptr ? relu_keep_nan(v[k]) : v[k]);
    store8<kVec>(out + base, valid, o);
    if (mask != nullptr) {
      unsigned bits = 0;
#pragma unroll
      for (int k = 0; k < kGroup; ++k)
        if (k < valid && !(static_cast<acc_t>(o[k]) <= acc_t(0))) bits |= 1u << k;
      mask[it.g] = static_cast<uint8_t>(bits);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> scale_bias_act_cuda(const at::Tensor& y_in, const at::Tensor& scale_in,
                                                       const at::Tensor& bias_in,
                                                       const std::optional<at::Tensor>& residual_in,
                                                       const std::optional<at::Tensor>& residual_scale_in,
                                                       const std::optional<at::Tensor>& residual_bias_in, bool relu) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const TailArgs a = prepare_tail(y_in, scale_in, bias_in, residual_in, residual_scale_in, residual_bias_in,
                                  at::MemoryFormat::ChannelsLast);
  const int64_t numel = a.y.layout.numel(), C = a.y.layout.channels;
  at::Tensor out = empty_activation(a.y.t);
  at::Tensor mask = at::empty({relu ? mask_bytes(numel) : 0}, a.y.t.options().dtype(at::kByte));
  if (numel == 0) return {restore(out, a.y), mask};
  const at::Tensor scale = aligned_channels(a.scale), bias = aligned_channels(a.bias);
  const auto rscale = aligned_channels(a.residual_scale), rbias = aligned_channels(a.residual_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, a.y.t.scalar_type(),
                                  "ext_scale_bias_act", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* yp = a.y.t.data_ptr<scalar_t>();
    const scalar_t* rp = data_or_null<scalar_t>(a.residual);
    scalar_t* op = out.data_ptr<scalar_t>();
    uint8_t* mp = relu ? mask.data_ptr<uint8_t>() : nullptr;
    const bool vec = C % kGroup == 0 && aligned16(yp) && aligned16(op) && (rp == nullptr || aligned16(rp));
    const auto kernel = vec ? scale_bias_act_kernel<scalar_t, true> : scale_bias_act_kernel<scalar_t, false>;
    kernel<<<flat_blocks(numel), kThreads, 0, current_stream()>>>(
        yp, scale.data_ptr<acc_t>(), bias.data_ptr<acc_t>(), rp, data_or_null<acc_t>(rscale),
        data_or_null<acc_t>(rbias), op, mp, numel, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {restore(out, a.y), mask};
}

// g = grad where the mask bit is set (grad without a mask); dy = g * scale, dresidual = g,
// or g * rscale with NQ == 3 (each only when its pointer is given); block partials of
// sum g * y (q = 0), sum g (q = 1) and, with NQ == 3, sum g * residual (q = 2) per channel.
// NQ is a template argument so that the common case keeps fewer values in registers.
template <typename scalar_t, bool kVec, int NQ>
__global__ void __launch_bounds__(kThreads, kReduceMinBlocks<scalar_t>) scale_bias_act_backward_kernel(
    const scalar_t* __restrict__ grad, const uint8_t* __restrict__ mask, const scalar_t* __restrict__ y,
    const acc_type<scalar_t>* __restrict__ scale, const scalar_t* __restrict__ residual,
    const acc_type<scalar_t>* __restrict__ rscale, scalar_t* __restrict__ dy, scalar_t* __restrict__ dresidual,
    int64_t M, int64_t C, int gx_shift, acc_type<scalar_t>* __restrict__ ws) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t smem[kGroup * kThreads];
  const RowLanes t(gx_shift, C);
  acc_t sum[NQ][kGroup] = {};
  if (t.valid > 0) {
    acc_t s[kGroup], rs[kGroup];
    load8<false>(scale + t.c0, t.valid, s);
    if constexpr (NQ == 3) load8<false>(rscale + t.c0, t.valid, rs);
    for (int64_t row = t.row0; row < M; row += t.row_step) {
      const int64_t off = row * C + t.c0;
      acc_t g[kGroup], v[kGroup];
      load8<kVec>(grad + off, t.valid, g);
      if (mask != nullptr) {
        if constexpr (kVec) {  // off % 8 == 0: the group is one mask byte
          const unsigned bits = mask[off / 8];
#pragma unroll
          for (int k = 0; k < kGroup; ++k)
            if (!((bits >> k) & 1u)) g[k] = acc_t(0);
        } else {
#pragma unroll
          for (int k = 0; k < kGroup; ++k) {
            const int64_t i = off + k;
            if (k < t.valid && !((mask[i / 8] >> (i % 8)) & 1)) g[k] = acc_t(0);
          }
        }
      }
      load8<kVec>(y + off, t.valid, v);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        sum[0][k] += g[k] * v[k];
        sum[1][k] += g[k];
      }
      if (dy != nullptr) {
#pragma unroll
        for (int k = 0; k < kGroup; ++k) v[k] = g[k] * s[k];
        store8<kVec>(dy + off, t.valid, v);
      }
      if constexpr (NQ == 3) {
        load8<kVec>(residual + off, t.valid, v);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) sum[2][k] += g[k] * v[k];
        if (dresidual != nullptr) {
#pragma unroll
          for (int k = 0; k < kGroup; ++k) v[k] = g[k] * rs[k];
          store8<kVec>(dresidual + off, t.valid, v);
        }
      } else if (dresidual != nullptr) {
        store8<kVec>(dresidual + off, t.valid, g);
      }
    }
  }
#pragma unroll
  for (int q = 0; q < NQ; ++q) store_partials(sum[q], smem, t, ws, q, C);
}

// Runs the backward pass and the combine of its NQ per-channel sums into `sums`.
template <int NQ, typename scalar_t>
void scale_bias_act_backward_launch(const TailBackwardArgs& a, scalar_t* dy, scalar_t* dresidual,
                                    const std::array<at::Tensor, NQ>& sums) {
  using acc_t = acc_type<scalar_t>;
  const int64_t M = a.y.layout.outer, C = a.y.layout.channels;
  const RowSplit split = row_split(M, C);
  const at::Tensor ws = at::empty({NQ, int64_t{split.grid.y}, C}, sums[0].options());
  const cudaStream_t stream = current_stream();
  const scalar_t* gp = a.grad.data_ptr<scalar_t>();
  const scalar_t* yp = a.y.t.data_ptr<scalar_t>();
  const scalar_t* rp = data_or_null<scalar_t>(a.residual);
  const bool vec = C % kGroup == 0 && aligned16(gp) && aligned16(yp) && (rp == nullptr || aligned16(rp)) &&
                   (dy == nullptr || aligned16(dy)) && (dresidual == nullptr || aligned16(dresidual));
  const auto kernel =
      vec ? scale_bias_act_backward_kernel<scalar_t, true, NQ> : scale_bias_act_backward_kernel<scalar_t, false, NQ>;
  kernel<<<split.grid, kThreads, 0, stream>>>(gp, data_or_null<uint8_t>(a.mask), yp, a.scale.data_ptr<acc_t>(), rp,
                                              data_or_null<acc_t>(a.residual_scale), dy, dresidual, M, C,
                                              split.gx_shift, ws.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  StoreSums<acc_t, NQ> store{};
  for (int q = 0; q < NQ; ++q) {
    const at::Tensor& sum = sums[q];
    store.out[q] = sum.data_ptr<acc_t>();
  }
  combine_partials<NQ, acc_t>(ws, store, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_bias_act_backward_cuda(
    const at::Tensor& grad_in, const std::optional<at::Tensor>& mask_in, const at::Tensor& y_in,
    const at::Tensor& scale_in, const std::optional<at::Tensor>& residual_in,
    const std::optional<at::Tensor>& residual_scale_in, bool need_dy, bool need_dresidual) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const TailBackwardArgs a = prepare_tail_backward(grad_in, mask_in, y_in, scale_in, residual_in, residual_scale_in,
                                                   at::MemoryFormat::ChannelsLast);
  const int64_t numel = a.y.layout.numel(), C = a.y.layout.channels;
  const bool has_rscale = a.residual_scale.has_value();
  const bool want_dresidual = need_dresidual && a.residual.has_value();
  const auto acc_opts = a.y.t.options().dtype(a.y.acc);
  at::Tensor dy = need_dy ? empty_activation(a.y.t) : empty_output(a.y.t);
  at::Tensor dresidual = want_dresidual ? empty_activation(a.y.t) : empty_output(a.y.t);
  at::Tensor dscale = at::empty({C}, acc_opts), dbias = at::empty({C}, acc_opts);
  at::Tensor dresidual_scale = has_rscale ? at::empty({C}, acc_opts) : empty_output(dscale);
  if (numel == 0) {  // no elements: the sums are 0
    dscale.zero_();
    dbias.zero_();
    dresidual_scale.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, a.y.t.scalar_type(),
                                    "ext_scale_bias_act_backward", [&] {
      scalar_t* dyp = need_dy ? dy.data_ptr<scalar_t>() : nullptr;
      scalar_t* drp = want_dresidual ? dresidual.data_ptr<scalar_t>() : nullptr;
      if (has_rscale) {
        scale_bias_act_backward_launch<3>(a, dyp, drp, std::array<at::Tensor, 3>{dscale, dbias, dresidual_scale});
      } else {
        scale_bias_act_backward_launch<2>(a, dyp, drp, std::array<at::Tensor, 2>{dscale, dbias});
      }
    });
  }
  if (need_dy) dy = restore(dy, a.y);
  if (want_dresidual) dresidual = restore(dresidual, a.y);
  return {dy, dscale, dbias, dresidual, dresidual_scale};
}

}  // namespace
}  // namespace cuda
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("ext_scale_bias_act", &fusedres::cuda::scale_bias_act_cuda);
  m.impl("ext_scale_bias_act_backward", &fusedres::cuda::scale_bias_act_backward_cuda);
}
