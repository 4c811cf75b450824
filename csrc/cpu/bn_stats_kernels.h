// Kernels compiled twice through compile_twice.h (see isa.h): no include guard, no includes.
namespace FUSEDRES_ISA {

// Shifted sums: with K_c = the channel's first element, s1 = sum(y - K), s2 = sum((y - K)^2)
// in double, then mean = K + s1/n and var = s2/n - (s1/n)^2. Shifting by a sample of the
// channel keeps the subtraction from cancelling when the mean is much larger than the
// spread (where E[y^2] - E[y]^2 would); chunked double sums keep large N*H*W safe.
template <typename scalar_t>
void bn_stats_kernel(const Activation& a, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const Layout& L = a.layout;
  const int64_t C = L.channels;
  const scalar_t* y = a.t.data_ptr<scalar_t>();
  std::vector<double> shift(static_cast<size_t>(C), 0.0);
  if (L.numel() > 0)
    for (int64_t c = 0; c < C; ++c) {
      const double first = static_cast<double>(y[c * L.inner]);
      shift[c] = std::isfinite(first) ? first : 0.0;  // then inf/NaN propagate as in the reference
    }
  const double* k = shift.data();
  const auto sums = channel_sums<2>(L, [&](double* partial, int64_t begin, int64_t end) {
    double* s1 = partial;
    double* s2 = partial + C;
    for_each_run(L, begin, end, [&](auto step, int64_t i0, int64_t len, int64_t c0) {
      if constexpr (decltype(step)::value == 1) {
        for (int64_t j = 0; j < len; ++j) {
          const double d = static_cast<double>(y[i0 + j]) - k[c0 + j];
          s1[c0 + j] += d;
          s2[c0 + j] += d * d;
        }
      } else {
        // One channel: 8 independent lanes, so the sums vectorise (a single running sum
        // is a serial chain of dependent adds). Fixed lane order: deterministic.
        constexpr int kLanes = 8;
        double t1[kLanes] = {}, t2[kLanes] = {};
        int64_t j = 0;
        for (; j + kLanes <= len; j += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const double d = static_cast<double>(y[i0 + j + l]) - k[c0];
            t1[l] += d;
            t2[l] += d * d;
          }
        }
        for (; j < len; ++j) {
          const double d = static_cast<double>(y[i0 + j]) - k[c0];
          t1[0] += d;
          t2[0] += d * d;
        }
        for (int l = 0; l < kLanes; ++l) {
          s1[c0] += t1[l];
          s2[c0] += t2[l];
        }
      }
    });
  });
  const double n = static_cast<double>(L.outer * L.inner);
  auto* m = mean.data_ptr<acc_t>();
  auto* v = var.data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    const double d = sums[c] / n;  // NaN for an empty batch, as torch.mean gives
    m[c] = static_cast<acc_t>(k[c] + d);
    v[c] = static_cast<acc_t>(std::max(sums[C + c] / n - d * d, 0.0));
    if (std::isnan(d)) v[c] = std::numeric_limits<acc_t>::quiet_NaN();
  }
}

}  // namespace FUSEDRES_ISA
