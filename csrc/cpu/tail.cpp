// CPU kernels: the block tail relu?(y*scale + bias + r) with its 1-bit ReLU mask, and its backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

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

template <typename scalar_t, int RES, bool RELU>
void tail_kernel(const TailArgs& a, at::Tensor& out, at::Tensor& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* y = a.y.t.data_ptr<scalar_t>();
  const scalar_t* r = ptr<scalar_t>(a.residual);
  const acc_t* s = a.scale.data_ptr<acc_t>();
  const acc_t* b = a.bias.data_ptr<acc_t>();
  const acc_t* rs = ptr<acc_t>(a.residual_scale);
  const acc_t* rb = ptr<acc_t>(a.residual_bias);
  scalar_t* o = out.data_ptr<scalar_t>();
  uint8_t* bits = RELU ? mask.data_ptr<uint8_t>() : nullptr;
  const int64_t numel = a.y.layout.numel();
  parallel_chunks(numel, [&](int64_t, int64_t begin, int64_t end) {
    for_each_run(a.y.layout, begin, end, [&](auto step, int64_t i0, int64_t len, int64_t c0) {
      constexpr int S = decltype(step)::value;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t i = i0 + j, c = c0 + S * j;
        acc_t v = static_cast<acc_t>(y[i]) * s[c] + b[c];
        if constexpr (RES == kIdentity) v += static_cast<acc_t>(r[i]);
        if constexpr (RES == kProjection) v += static_cast<acc_t>(r[i]) * rs[c] + rb[c];
        if constexpr (RELU) v = relu(v);
        o[i] = static_cast<scalar_t>(v);
      }
    });
    if constexpr (RELU) {
      // Bit set where the stored output is not <= 0 (NaN passes its gradient, as with the saved output).
      for (int64_t q = begin / 8; q * 8 < end; ++q) {
        uint8_t byte = 0;
        for (int64_t j = 0; j < 8 && q * 8 + j < end; ++j)
          byte |= static_cast<uint8_t>(!(static_cast<acc_t>(o[q * 8 + j]) <= acc_t(0))) << j;
        bits[q] = byte;
      }
    }
  });
}

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
      with_flag(relu, [&](auto act) { tail_kernel<scalar_t, decltype(res)::value, decltype(act)::value>(a, out, mask); });
    });
  });
  return {restore(out, a.y), mask};
}

// g = grad where the mask bit is set; dy = g*scale, dresidual = g or g*residual_scale,
// and the per-channel sums of g*y, g, g*residual in one pass.
template <typename scalar_t, int RES, bool MASK>
std::vector<double> tail_backward_kernel(const TailBackwardArgs& a, scalar_t* dy, scalar_t* dres) {
  using acc_t = at::opmath_type<scalar_t>;
  const Layout& L = a.y.layout;
  const int64_t C = L.channels;
  const scalar_t* gr = a.grad.data_ptr<scalar_t>();
  const scalar_t* y = a.y.t.data_ptr<scalar_t>();
  const scalar_t* r = ptr<scalar_t>(a.residual);
  const uint8_t* bits = MASK ? a.mask->data_ptr<uint8_t>() : nullptr;
  const acc_t* s = a.scale.data_ptr<acc_t>();
  const acc_t* rs = ptr<acc_t>(a.residual_scale);
  constexpr int NSUMS = RES == kProjection ? 3 : 2;
  return channel_sums<NSUMS>(L, [&](double* partial, int64_t begin, int64_t end) {
    for_each_run(L, begin, end, [&](auto step, int64_t i0, int64_t len, int64_t c0) {
      constexpr int S = decltype(step)::value;
      double t_gy = 0, t_g = 0, t_gr = 0;  // per-run sums (NCHW: one channel)
      for (int64_t j = 0; j < len; ++j) {
        const int64_t i = i0 + j, c = c0 + S * j;
        acc_t g = static_cast<acc_t>(gr[i]);
        if constexpr (MASK) g = ((bits[i >> 3] >> (i & 7)) & 1) ? g : acc_t(0);
        if (dy) dy[i] = static_cast<scalar_t>(g * s[c]);
        if constexpr (RES == kIdentity) {
          if (dres) dres[i] = static_cast<scalar_t>(g);
        }
        if constexpr (RES == kProjection) {
          if (dres) dres[i] = static_cast<scalar_t>(g * rs[c]);
        }
        const double gy = static_cast<double>(g) * static_cast<double>(y[i]);
        const double grr = RES == kProjection ? static_cast<double>(g) * static_cast<double>(r[i]) : 0.0;
        if constexpr (S == 1) {
          partial[c] += gy;
          partial[C + c] += g;
          if constexpr (RES == kProjection) partial[2 * C + c] += grr;
        } else {
          t_gy += gy;
          t_g += g;
          t_gr += grr;
        }
      }
      if constexpr (S == 0) {
        partial[c0] += t_gy;
        partial[C + c0] += t_g;
        if constexpr (RES == kProjection) partial[2 * C + c0] += t_gr;
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_bias_act_backward_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& mask, const at::Tensor& y, const at::Tensor& scale,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale, bool need_dy,
    bool need_dresidual) {
  const TailBackwardArgs a = prepare_tail_backward(grad, mask, y, scale, residual, residual_scale, std::nullopt);
  const Residual kind = residual_kind(a.residual, a.residual_scale);
  const bool want_dres = need_dresidual && kind != kNone;
  at::Tensor dy = need_dy ? at::empty_like(a.y.t) : empty_output(a.y.t);
  at::Tensor dres = want_dres ? at::empty_like(a.y.t) : empty_output(a.y.t);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.t.scalar_type(), "ext_scale_bias_act_backward", [&] {
    scalar_t* dy_p = need_dy ? dy.data_ptr<scalar_t>() : nullptr;
    scalar_t* dres_p = want_dres ? dres.data_ptr<scalar_t>() : nullptr;
    with_residual(kind, [&](auto res) {
      with_flag(a.mask.has_value(), [&](auto has_mask) {
        sums = tail_backward_kernel<scalar_t, decltype(res)::value, decltype(has_mask)::value>(a, dy_p, dres_p);
      });
    });
  });
  const int64_t C = a.y.layout.channels;
  auto per_channel_out = [&](int k) {
    return at::from_blob(sums.data() + k * C, {C}, at::kDouble).to(a.y.acc, false, /*copy=*/true);
  };
  at::Tensor dres_scale = kind == kProjection ? per_channel_out(2) : at::empty({0}, a.y.t.options().dtype(a.y.acc));
  return {need_dy ? restore(dy, a.y) : dy, per_channel_out(0), per_channel_out(1),
          want_dres ? restore(dres, a.y) : dres, dres_scale};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("ext_scale_bias_act", &cpu::scale_bias_act_cpu);
  m.impl("ext_scale_bias_act_backward", &cpu::scale_bias_act_backward_cpu);
}

}  // namespace fusedres
