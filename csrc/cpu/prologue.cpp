// CPU kernels: the BatchNorm prologue of a conv input relu?(x*scale + shift) and its
// backward, and the gradient of a conv output whose batch statistics were taken.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/loops.h"

namespace fusedres {
namespace cpu {
namespace {


#define FUSEDRES_KERNELS "cpu/prologue_kernels.h"
#include "cpu/compile_twice.h"

at::Tensor prologue_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  const PrologueArgs a = prepare_prologue(std::nullopt, x, scale, shift, std::nullopt);
  at::Tensor out = at::empty_like(a.x.t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.t.scalar_type(), "ext_prologue", [&] {
    with_flag(relu, [&](auto act) { FUSEDRES_CPU_CALL(prologue_kernel<scalar_t, decltype(act)::value>(a, out)); });
  });
  return restore(out, a.x);
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> prologue_backward_cpu(const at::Tensor& grad_a, const at::Tensor& x,
                                                                     const at::Tensor& scale, const at::Tensor& shift,
                                                                     bool relu, bool need_dx) {
  const PrologueArgs a = prepare_prologue(grad_a, x, scale, shift, std::nullopt);
  // dx is always written (a branch in the loop would keep it from vectorizing); it is
  // dropped when not asked for.
  at::Tensor dx = at::empty_like(a.x.t);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.t.scalar_type(), "ext_prologue_backward", [&] {
    scalar_t* dx_p = dx.data_ptr<scalar_t>();
    with_flag(relu, [&](auto act) { sums = FUSEDRES_CPU_CALL(prologue_backward_kernel<scalar_t, decltype(act)::value>(a, dx_p)); });
  });
  const int64_t C = a.x.layout.channels;
  auto per_channel_out = [&](int k) {
    return at::from_blob(sums.data() + k * C, {C}, at::kDouble).to(a.x.acc, false, /*copy=*/true);
  };
  return {need_dx ? restore(dx, a.x) : empty_output(a.x.t), per_channel_out(0), per_channel_out(1)};
}


at::Tensor conv_bn_stats_grad_y_cpu(const std::optional<at::Tensor>& grad_y, const at::Tensor& y,
                                    const at::Tensor& mean, const std::optional<at::Tensor>& grad_mean,
                                    const std::optional<at::Tensor>& grad_var) {
  const GradYArgs a = prepare_grad_y(grad_y, y, mean, grad_mean, grad_var, std::nullopt);
  at::Tensor out = at::empty_like(a.y.t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.t.scalar_type(), "ext_conv_bn_stats_grad_y", [&] {
    with_flag(a.grad_y.has_value(), [&](auto has_gy) {
      with_flag(a.grad_mean.has_value(), [&](auto has_gm) {
        with_flag(a.grad_var.has_value(), [&](auto has_gv) {
          FUSEDRES_CPU_CALL(
              grad_y_kernel<scalar_t, decltype(has_gy)::value, decltype(has_gm)::value, decltype(has_gv)::value>(a, out));
        });
      });
    });
  });
  return restore(out, a.y);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("ext_prologue", &cpu::prologue_cpu);
  m.impl("ext_prologue_backward", &cpu::prologue_backward_cpu);
  m.impl("ext_conv_bn_stats_grad_y", &cpu::conv_bn_stats_grad_y_cpu);
}

}  // namespace fusedres
