// CPU kernels: the block tail relu?(y*scale + bias + r) with its 1-bit ReLU mask, and its backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/loops.h"

namespace fusedres {
namespace cpu {
namespace {

enum Residual { kNone = 0, kIdentity = 1, kProjection = 2 };

inline Residual residual_kind(const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& scale) {
  return !residual.has_value() ? kNone : (scale.has_value() ? kProjection : kIdentity);
}

// Calls f with the residual kind as a compile-time constant.
template <typename F>
inline void with_residual(Residual kind, const F& f) {
  switch (kind) {
    case kNone: f(std::integral_constant<int, kNone>{}); break;
    case kIdentity: f(std::integral_constant<int, kIdentity>{}); break;
    case kProjection: f(std::integral_constant<int, kProjection>{}); break;
  }
}

template <typename T>
inline const T* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}


#define FUSEDRES_KERNELS "cpu/tail_kernels.h"
#include "cpu/compile_twice.h"

std::tuple<at::Tensor, at::Tensor> scale_bias_act_cpu(const at::Tensor& y, const at::Tensor& scale,
                                                      const at::Tensor& bias,
                                                      const std::optional<at::Tensor>& residual,
                                                      const std::optional<at::Tensor>& residual_scale,
                                                      const std::optional<at::Tensor>& residual_bias, bool relu) {
  const TailArgs a = prepare_tail(y, scale, bias, residual, residual_scale, residual_bias, std::nullopt);
  at::Tensor out = at::empty_like(a.y.t);
  at::Tensor mask = at::empty({relu ? mask_bytes(a.y.layout.numel()) : 0}, a.y.t.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.t.scalar_type(), "ext_scale_bias_act", [&] {
    with_residual(residual_kind(a.residual, a.residual_scale), [&](auto res) {
      with_flag(relu, [&](auto act) { FUSEDRES_CPU_CALL(tail_kernel<scalar_t, decltype(res)::value, decltype(act)::value>(a, out, mask)); });
    });
  });
  return {restore(out, a.y), mask};
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_bias_act_backward_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& mask, const at::Tensor& y, const at::Tensor& scale,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale, bool need_dy,
    bool need_dresidual) {
  const TailBackwardArgs a = prepare_tail_backward(grad, mask, y, scale, residual, residual_scale, std::nullopt);
  const Residual kind = residual_kind(a.residual, a.residual_scale);
  const bool want_dres = need_dresidual && kind != kNone;
  // dy and dresidual are always written (branches in the loop would keep it from
  // vectorizing); what was not asked for is dropped.
  at::Tensor dy = at::empty_like(a.y.t);
  at::Tensor dres = kind != kNone ? at::empty_like(a.y.t) : empty_output(a.y.t);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.t.scalar_type(), "ext_scale_bias_act_backward", [&] {
    scalar_t* dy_p = dy.data_ptr<scalar_t>();
    scalar_t* dres_p = kind != kNone ? dres.data_ptr<scalar_t>() : nullptr;
    with_residual(kind, [&](auto res) {
      with_flag(a.mask.has_value(), [&](auto has_mask) {
        sums = FUSEDRES_CPU_CALL(tail_backward_kernel<scalar_t, decltype(res)::value, decltype(has_mask)::value>(a, dy_p, dres_p));
      });
    });
  });
  const int64_t C = a.y.layout.channels;
  auto per_channel_out = [&](int k) {
    return at::from_blob(sums.data() + k * C, {C}, at::kDouble).to(a.y.acc, false, /*copy=*/true);
  };
  at::Tensor dres_scale = kind == kProjection ? per_channel_out(2) : at::empty({0}, a.y.t.options().dtype(a.y.acc));
  return {need_dy ? restore(dy, a.y) : empty_output(a.y.t), per_channel_out(0), per_channel_out(1),
          want_dres ? restore(dres, a.y) : empty_output(a.y.t), dres_scale};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("ext_scale_bias_act", &cpu::scale_bias_act_cpu);
  m.impl("ext_scale_bias_act_backward", &cpu::scale_bias_act_backward_cpu);
}

}  // namespace fusedres
