// Host-side argument checks and layout helpers shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fusedres {

// float64 activations accumulate in float64, every other floating dtype in float32.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The activation as (outer, C, inner): channels_last is (N*H*W, C, 1), NCHW is (N, C, H*W).
struct Layout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  at::MemoryFormat format;
  int64_t numel() const { return outer * channels * inner; }
};

inline Layout layout_of(const at::Tensor& y, at::MemoryFormat format) {
  const int64_t n = y.size(0), c = y.size(1), hw = y.size(2) * y.size(3);
  if (format == at::MemoryFormat::ChannelsLast) return {n * hw, c, 1, format};
  return {n, c, hw, format};
}

// The main activation: 4-D, floating, made contiguous in `format` (its own suggested
// format when none is given).
inline at::Tensor activation(const at::Tensor& y, const char* op, const char* name,
                             std::optional<at::MemoryFormat> format = std::nullopt) {
  TORCH_CHECK(y.dim() == 4, "fusedres::", op, ": ", name, " must be 4-D (N, C, H, W), got shape ", y.sizes());
  const auto t = y.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, "fusedres::", op, ": ",
              name, " must be float16, bfloat16, float32 or float64, got ", t);
  return y.contiguous(format.value_or(y.suggest_memory_format()));
}

// A second activation read alongside y: same shape and device, read in y's dtype and layout.
inline at::Tensor like(const at::Tensor& t, const at::Tensor& y, at::MemoryFormat format, const char* op,
                       const char* name) {
  TORCH_CHECK(t.sizes() == y.sizes(), "fusedres::", op, ": ", name, " must have shape ", y.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == y.device(), "fusedres::", op, ": ", name, " is on ", t.device(), ", expected ",
              y.device());
  TORCH_CHECK(t.is_floating_point(), "fusedres::", op, ": ", name, " must be floating point, got ", t.scalar_type());
  return t.to(y.scalar_type()).contiguous(format);
}

// A per-channel vector of `channels` elements, read in the accumulation dtype `acc`.
inline at::Tensor per_channel(const at::Tensor& t, int64_t channels, at::ScalarType acc, const at::Device& device,
                              const char* op, const char* name) {
  TORCH_CHECK(t.numel() == channels, "fusedres::", op, ": ", name, " must have ", channels,
              " elements (one per channel), got shape ", t.sizes());
  TORCH_CHECK(t.device() == device, "fusedres::", op, ": ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.is_floating_point(), "fusedres::", op, ": ", name, " must be floating point, got ", t.scalar_type());
  return t.to(acc).contiguous().view({channels});
}

inline std::optional<at::Tensor> per_channel(const std::optional<at::Tensor>& t, int64_t channels,
                                             at::ScalarType acc, const at::Device& device, const char* op,
                                             const char* name) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return per_channel(*t, channels, acc, device, op, name);
}

inline int64_t mask_bytes(int64_t numel) { return (numel + 7) / 8; }

// An empty tensor for an output that was not asked for.
inline at::Tensor empty_output(const at::Tensor& like_tensor) { return at::empty({0}, like_tensor.options()); }

// ---- Validated, normalised arguments of each op (the CPU and CUDA launchers share them).
// `format` is the layout the kernels run in: std::nullopt = the activation's own suggested
// format (CPU), ChannelsLast (CUDA). `original` is the format outputs are returned in.

struct Activation {
  at::Tensor t;               // contiguous in layout.format
  Layout layout;
  at::ScalarType acc;         // accumulation dtype
  at::MemoryFormat original;  // the caller's memory format
};

inline Activation prepare_activation(const at::Tensor& y, std::optional<at::MemoryFormat> format, const char* op,
                                     const char* name) {
  const at::MemoryFormat original = y.dim() == 4 ? y.suggest_memory_format() : at::MemoryFormat::Contiguous;
  at::Tensor t = activation(y, op, name, format);
  const at::MemoryFormat used = format.value_or(original);
  return {t, layout_of(t, used), accumulation_type(t.scalar_type()), original};
}

// An elementwise output in the caller's memory format.
inline at::Tensor restore(const at::Tensor& out, const Activation& a) { return out.contiguous(a.original); }

struct TailArgs {
  Activation y;
  at::Tensor scale, bias;
  std::optional<at::Tensor> residual, residual_scale, residual_bias;
};

inline TailArgs prepare_tail(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
                             const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
                             const std::optional<at::Tensor>& residual_bias, std::optional<at::MemoryFormat> format) {
  const char* op = "ext_scale_bias_act";
  TailArgs a{prepare_activation(y, format, op, "y"), {}, {}, std::nullopt, std::nullopt, std::nullopt};
  const int64_t c = a.y.layout.channels;
  const auto dev = a.y.t.device();
  a.scale = per_channel(scale, c, a.y.acc, dev, op, "scale");
  a.bias = per_channel(bias, c, a.y.acc, dev, op, "bias");
  if (residual.has_value() && residual->defined()) a.residual = like(*residual, a.y.t, a.y.layout.format, op, "residual");
  a.residual_scale = per_channel(residual_scale, c, a.y.acc, dev, op, "residual_scale");
  a.residual_bias = per_channel(residual_bias, c, a.y.acc, dev, op, "residual_bias");
  TORCH_CHECK(a.residual_scale.has_value() == a.residual_bias.has_value(), "fusedres::", op,
              ": residual_scale and residual_bias must be given together");
  TORCH_CHECK(!a.residual_scale.has_value() || a.residual.has_value(), "fusedres::", op,
              ": residual_scale needs a residual");
  return a;
}

struct TailBackwardArgs {
  Activation y;
  at::Tensor grad, scale;
  std::optional<at::Tensor> mask, residual, residual_scale;
};

inline TailBackwardArgs prepare_tail_backward(const at::Tensor& grad, const std::optional<at::Tensor>& mask,
                                              const at::Tensor& y, const at::Tensor& scale,
                                              const std::optional<at::Tensor>& residual,
                                              const std::optional<at::Tensor>& residual_scale,
                                              std::optional<at::MemoryFormat> format) {
  const char* op = "ext_scale_bias_act_backward";
  TailBackwardArgs a{prepare_activation(y, format, op, "y"), {}, {}, std::nullopt, std::nullopt, std::nullopt};
  const auto dev = a.y.t.device();
  const int64_t c = a.y.layout.channels;
  a.grad = like(grad, a.y.t, a.y.layout.format, op, "grad");
  a.scale = per_channel(scale, c, a.y.acc, dev, op, "scale");
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kByte && mask->numel() == mask_bytes(a.y.layout.numel()), "fusedres::", op,
                ": mask must be the uint8 mask of ext_scale_bias_act (", mask_bytes(a.y.layout.numel()),
                " bytes), got ", mask->scalar_type(), " of shape ", mask->sizes());
    TORCH_CHECK(mask->device() == dev, "fusedres::", op, ": mask is on ", mask->device(), ", expected ", dev);
    a.mask = mask->contiguous();
  }
  if (residual.has_value() && residual->defined()) a.residual = like(*residual, a.y.t, a.y.layout.format, op, "residual");
  a.residual_scale = per_channel(residual_scale, c, a.y.acc, dev, op, "residual_scale");
  TORCH_CHECK(!a.residual_scale.has_value() || a.residual.has_value(), "fusedres::", op,
              ": residual_scale needs a residual");
  return a;
}

struct GradYArgs {
  Activation y;
  at::Tensor mean;
  std::optional<at::Tensor> grad_y, grad_mean, grad_var;
};

inline GradYArgs prepare_grad_y(const std::optional<at::Tensor>& grad_y, const at::Tensor& y, const at::Tensor& mean,
                                const std::optional<at::Tensor>& grad_mean, const std::optional<at::Tensor>& grad_var,
                                std::optional<at::MemoryFormat> format) {
  const char* op = "ext_conv_bn_stats_grad_y";
  GradYArgs a{prepare_activation(y, format, op, "y"), {}, std::nullopt, std::nullopt, std::nullopt};
  const auto dev = a.y.t.device();
  const int64_t c = a.y.layout.channels;
  a.mean = per_channel(mean, c, a.y.acc, dev, op, "mean");
  if (grad_y.has_value() && grad_y->defined()) a.grad_y = like(*grad_y, a.y.t, a.y.layout.format, op, "grad_y");
  a.grad_mean = per_channel(grad_mean, c, a.y.acc, dev, op, "grad_mean");
  a.grad_var = per_channel(grad_var, c, a.y.acc, dev, op, "grad_var");
  return a;
}

struct PrologueArgs {
  Activation x;
  at::Tensor scale, shift;
  std::optional<at::Tensor> grad_a;
};

inline PrologueArgs prepare_prologue(const std::optional<at::Tensor>& grad_a, const at::Tensor& x,
                                     const at::Tensor& scale, const at::Tensor& shift,
                                     std::optional<at::MemoryFormat> format) {
  const char* op = grad_a.has_value() ? "ext_prologue_backward" : "ext_prologue";
  PrologueArgs a{prepare_activation(x, format, op, "x"), {}, {}, std::nullopt};
  const auto dev = a.x.t.device();
  const int64_t c = a.x.layout.channels;
  a.scale = per_channel(scale, c, a.x.acc, dev, op, "scale");
  a.shift = per_channel(shift, c, a.x.acc, dev, op, "shift");
  if (grad_a.has_value()) a.grad_a = like(*grad_a, a.x.t, a.x.layout.format, op, "grad_a");
  return a;
}

// ext_bn_finalize / ext_bn_update_running_stats: per-channel vectors on one device.
inline void check_stats(const at::Tensor& mean, const at::Tensor& var, const char* op) {
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes(), "fusedres::", op,
              ": mean and var must be 1-D of the same length, got ", mean.sizes(), " and ", var.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, "fusedres::", op,
              ": mean must be float32 or float64 (the accumulation dtype), got ", mean.scalar_type());
  TORCH_CHECK(var.scalar_type() == mean.scalar_type() && var.device() == mean.device(), "fusedres::", op,
              ": var must match mean's dtype and device");
}

struct RunningStatsArgs {
  at::Tensor mean, var;  // contiguous, accumulation dtype
  int64_t count;
};

// Checks the running statistics and mean/var, bumps the running tensors' version counters (the
// caller's kernel then writes them in place) and returns mean and var contiguous.
inline RunningStatsArgs prepare_running_stats_and_bump_versions(const at::Tensor& running_mean,
                                                                const at::Tensor& running_var,
                                                                const at::Tensor& num_batches_tracked,
                                                                const at::Tensor& mean, const at::Tensor& var,
                                                                int64_t count) {
  const char* op = "ext_bn_update_running_stats";
  check_stats(mean, var, op);
  const int64_t c = mean.numel();
  for (const auto* t : {&running_mean, &running_var}) {
    TORCH_CHECK(t->numel() == c && t->is_contiguous() && t->is_floating_point() && t->device() == mean.device(),
                "fusedres::", op, ": running statistics must be contiguous floating tensors of ", c,
                " elements on ", mean.device(), ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ",
                t->device());
  }
  TORCH_CHECK(running_var.scalar_type() == running_mean.scalar_type(), "fusedres::", op,
              ": running_mean and running_var must have one dtype");
  TORCH_CHECK(num_batches_tracked.numel() == 1 && num_batches_tracked.scalar_type() == at::kLong &&
                  num_batches_tracked.device() == mean.device(),
              "fusedres::", op, ": num_batches_tracked must be a one-element int64 tensor on ", mean.device());
  TORCH_CHECK(count >= 2, "fusedres::", op, ": count must be at least 2 (the unbiased variance), got ", count);
  // The kernels write these in place. A C++ op gets no ADInplaceOrView kernel that would bump
  // their version counters, and code keyed on them (fusedres' folded-weight cache, autograd's
  // saved-tensor checks) must see the change.
  for (const auto* t : {&running_mean, &running_var, &num_batches_tracked}) t->unsafeGetTensorImpl()->bump_version();
  return {mean.contiguous(), var.contiguous(), count};
}

}  // namespace fusedres
