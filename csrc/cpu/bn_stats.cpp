// CPU kernels: batch statistics, their finalize step and the running-statistics update.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cpu/isa.h"
#include "cpu/loops.h"

namespace fusedres {
namespace cpu {
namespace {


#define FUSEDRES_KERNELS "cpu/bn_stats_kernels.h"
#include "cpu/compile_twice.h"

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& y) {
  const Activation a = prepare_activation(y, std::nullopt, "ext_bn_stats", "y");
  auto opts = a.t.options().dtype(a.acc);
  at::Tensor mean = at::empty({a.layout.channels}, opts), var = at::empty({a.layout.channels}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.t.scalar_type(), "ext_bn_stats",
                                  [&] { FUSEDRES_CPU_CALL(bn_stats_kernel<scalar_t>(a, mean, var)); });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cpu(const at::Tensor& mean, const at::Tensor& var,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "ext_bn_finalize";
  check_stats(mean, var, op);
  const int64_t C = mean.numel();
  const auto acc = mean.scalar_type();
  const auto w = per_channel(weight, C, acc, mean.device(), op, "weight");
  const auto b = per_channel(bias, C, acc, mean.device(), op, "bias");
  at::Tensor scale = at::empty({C}, mean.options()), shift = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "ext_bn_finalize", [&] {
    const at::Tensor m_t = mean.contiguous(), v_t = var.contiguous();
    const scalar_t* m = m_t.data_ptr<scalar_t>();
    const scalar_t* v = v_t.data_ptr<scalar_t>();
    const scalar_t* wp = w ? w->data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b ? b->data_ptr<scalar_t>() : nullptr;
    scalar_t* s = scale.data_ptr<scalar_t>();
    scalar_t* t = shift.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      scalar_t sc = scalar_t(1) / std::sqrt(v[c] + static_cast<scalar_t>(eps));
      if (wp) sc *= wp[c];
      s[c] = sc;
      t[c] = (bp ? bp[c] : scalar_t(0)) - m[c] * sc;
    }
  });
  return {scale, shift};
}

void bn_update_running_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& num_batches_tracked, const at::Tensor& mean, const at::Tensor& var,
                                 std::optional<double> momentum, int64_t count) {
  const RunningStatsArgs a =
      prepare_running_stats_and_bump_versions(running_mean, running_var, num_batches_tracked, mean, var, count);
  int64_t* tracked = num_batches_tracked.data_ptr<int64_t>();
  *tracked += 1;
  AT_DISPATCH_FLOATING_TYPES(a.mean.scalar_type(), "ext_bn_update_running_stats", [&] {
    using acc_t = scalar_t;
    const acc_t f = momentum.has_value() ? static_cast<acc_t>(*momentum) : acc_t(1) / static_cast<acc_t>(*tracked);
    const acc_t unbias = static_cast<acc_t>(count) / static_cast<acc_t>(count - 1);
    const acc_t* m = a.mean.data_ptr<acc_t>();
    const acc_t* v = a.var.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "running_stats", [&] {
      scalar_t* rm = running_mean.data_ptr<scalar_t>();
      scalar_t* rv = running_var.data_ptr<scalar_t>();
      for (int64_t c = 0; c < a.mean.numel(); ++c) {
        rm[c] = static_cast<scalar_t>((acc_t(1) - f) * static_cast<acc_t>(rm[c]) + f * m[c]);
        rv[c] = static_cast<scalar_t>((acc_t(1) - f) * static_cast<acc_t>(rv[c]) + f * v[c] * unbias);
      }
    });
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("ext_bn_stats", &cpu::bn_stats_cpu);
  m.impl("ext_bn_finalize", &cpu::bn_finalize_cpu);
  m.impl("ext_bn_update_running_stats", &cpu::bn_update_running_stats_cpu);
}

}  // namespace fusedres
