// Kernels compiled twice through compile_twice.h (see isa.h): no include guard, no includes.
namespace FUSEDRES_ISA {

template <typename scalar_t, bool RELU>
void prologue_kernel(const PrologueArgs& a, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = a.x.t.data_ptr<scalar_t>();
  const acc_t* s = a.scale.data_ptr<acc_t>();
  const acc_t* b = a.shift.data_ptr<acc_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  parallel_chunks(a.x.layout.numel(), [&](int64_t, int64_t begin, int64_t end) {
    for_each_run(a.x.layout, begin, end, [&](auto step, int64_t i0, int64_t len, int64_t c0) {
      constexpr int S = decltype(step)::value;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t c = c0 + S * j;
        acc_t v = static_cast<acc_t>(x[i0 + j]) * s[c] + b[c];
        if constexpr (RELU) v = relu(v);
        o[i0 + j] = static_cast<scalar_t>(v);
      }
    });
  });
}

// g = grad_a where not (relu and x*scale + shift <= 0); dx = g*scale and the per-channel
// sums of g*x and g, in one pass.
template <typename scalar_t, bool RELU>
std::vector<double> prologue_backward_kernel(const PrologueArgs& a, scalar_t* dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const Layout& L = a.x.layout;
  const int64_t C = L.channels;
  const scalar_t* ga = a.grad_a->data_ptr<scalar_t>();
  const scalar_t* x = a.x.t.data_ptr<scalar_t>();
  const acc_t* s = a.scale.data_ptr<acc_t>();
  const acc_t* b = a.shift.data_ptr<acc_t>();
  return channel_sums<2>(L, [&](double* partial, int64_t begin, int64_t end) {
    for_each_run(L, begin, end, [&](auto step, int64_t i0, int64_t len, int64_t c0) {
      constexpr int S = decltype(step)::value;
      double t_gx = 0, t_g = 0;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t i = i0 + j, c = c0 + S * j;
        const acc_t xv = static_cast<acc_t>(x[i]);
        acc_t g = static_cast<acc_t>(ga[i]);
        if constexpr (RELU) g = keep_if(!(xv * s[c] + b[c] <= acc_t(0)), g);
        dx[i] = static_cast<scalar_t>(g * s[c]);
        const double gx = static_cast<double>(g) * static_cast<double>(xv);
        if constexpr (S == 1) {
          partial[c] += gx;
          partial[C + c] += g;
        } else {
          t_gx += gx;
          t_g += g;
        }
      }
      if constexpr (S == 0) {
        partial[c0] += t_gx;
        partial[C + c0] += t_g;
      }
    });
  });
}

// grad_y + grad_mean/count + (y - mean) * grad_var * 2/count, per element.
template <typename scalar_t, bool HAS_GY, bool HAS_GM, bool HAS_GV>
void grad_y_kernel(const GradYArgs& a, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Layout& L = a.y.layout;
  const acc_t count = static_cast<acc_t>(L.outer * L.inner);
  const scalar_t* y = a.y.t.data_ptr<scalar_t>();
  const scalar_t* gy = HAS_GY ? a.grad_y->data_ptr<scalar_t>() : nullptr;
  const acc_t* mean = a.mean.data_ptr<acc_t>();
  const acc_t* gm = HAS_GM ? a.grad_mean->data_ptr<acc_t>() : nullptr;
  const acc_t* gv = HAS_GV ? a.grad_var->data_ptr<acc_t>() : nullptr;
  scalar_t* o = out.data_ptr<scalar_t>();
  const acc_t two_over_count = acc_t(2) / count;
  parallel_chunks(L.numel(), [&](int64_t, int64_t begin, int64_t end) {
    for_each_run(L, begin, end, [&](auto step, int64_t i0, int64_t len, int64_t c0) {
      constexpr int S = decltype(step)::value;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t i = i0 + j, c = c0 + S * j;
        acc_t v = HAS_GY ? static_cast<acc_t>(gy[i]) : acc_t(0);
        if constexpr (HAS_GM) v += gm[c] / count;
        if constexpr (HAS_GV) v += (static_cast<acc_t>(y[i]) - mean[c]) * gv[c] * two_over_count;
        o[i] = static_cast<scalar_t>(v);
      }
    });
  });
}

}  // namespace FUSEDRES_ISA
