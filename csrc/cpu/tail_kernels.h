// Kernels compiled twice through compile_twice.h (see isa.h): no include guard, no includes.
namespace FUSEDRES_ISA {

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
    if constexpr (RELU) pack_relu_mask<scalar_t, acc_t>(o, begin, end, bits);
  });
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
        if constexpr (MASK) g = keep_if((bits[i >> 3] >> (i & 7)) & 1, g);
        dy[i] = static_cast<scalar_t>(g * s[c]);
        if constexpr (RES == kIdentity) dres[i] = static_cast<scalar_t>(g);
        if constexpr (RES == kProjection) dres[i] = static_cast<scalar_t>(g * rs[c]);
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

}  // namespace FUSEDRES_ISA
