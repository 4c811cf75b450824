// fusedres._C: the op schemas of the C++/CUDA extension.
//
// Kernels live in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(fusedres, CPU, ...)) and
// csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(fusedres, CUDA, ...)); fake implementations and the
// autograd of ext_bn_finalize are registered in Python (fusedres/ext.py). The public,
// backend-dispatching ops (fusedres::bn_stats, ::scale_bias_act, ...) are Python custom ops
// in the same namespace: the `cuda` backend (fusedres/backends/cuda_backend.py) runs them
// with these kernels. Semantics: fusedres/reference.py and fusedres/backends/base.py.
//
// Conventions shared by every op (checked in csrc/common.h):
// * activations are 4-D (N, C, H, W) in float16, bfloat16, float32 or float64, NCHW-contiguous
//   or channels_last (anything else is made contiguous in its suggested memory format first);
//   elementwise outputs have the activation's dtype and memory format;
// * per-channel tensors (scale, shift, mean, ...) have C elements of any floating dtype and are
//   read in the accumulation dtype: float64 for float64 activations, float32 otherwise;
//   per-channel outputs are in the accumulation dtype;
// * a second activation (residual, grad) must have y's shape; it is read in y's dtype
//   and memory format (converted first if it differs).
// * the ReLU mask is 1 bit per element, bit (i % 8) of byte (i / 8), i = the element's
//   position in the layout the kernel ran in (CPU: y's memory format; CUDA: channels_last).
//   A set bit means the output was not <= 0 (so NaN passes its gradient, as torch.relu's
//   backward does); it is opaque to callers and read only by ext_scale_bias_act_backward.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing fusedres._C loads the library, whose static initialisers
// register the ops with the dispatcher. No pybind11, so the limited API suffices.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fusedres, m) {
  // (mean, biased var) per channel over (N, H, W), in the accumulation dtype.
  m.def("ext_bn_stats(Tensor y) -> (Tensor, Tensor)");
  // (scale, shift) = (weight * rsqrt(var + eps), bias - mean * scale); a missing weight is 1,
  // a missing bias 0. Differentiable (autograd registered in Python).
  m.def("ext_bn_finalize(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)");
  // nn.BatchNorm2d's running-statistics update, in place: num_batches_tracked += 1, then with
  // f = momentum (or 1 / num_batches_tracked when momentum is None: cumulative average)
  // running_mean = (1 - f) * running_mean + f * mean,
  // running_var = (1 - f) * running_var + f * var * count / (count - 1). count >= 2.
  m.def("ext_bn_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor(c!) num_batches_tracked, Tensor mean, Tensor var, float? momentum, int count) -> ()");
  // The block tail: out = relu?(y * scale + bias + r), r = residual * residual_scale +
  // residual_bias when residual_scale is given (a projection shortcut's BN), r = residual
  // otherwise, 0 without a residual. Returns (out, mask); mask is uint8 of ceil(numel / 8)
  // bytes when relu, else empty.
  m.def("ext_scale_bias_act(Tensor y, Tensor scale, Tensor bias, Tensor? residual, Tensor? residual_scale, "
        "Tensor? residual_bias, bool relu) -> (Tensor, Tensor)");
  // Its backward. g = grad where the mask bit is set (all of grad without a mask), in the
  // accumulation dtype. Returns (dy, dscale, dbias, dresidual, dresidual_scale):
  // dy = g * scale (y's dtype; empty unless need_dy), dscale = sum g * y, dbias = sum g
  // (also the gradient of residual_bias), dresidual = g, or g * residual_scale with a
  // residual_scale (y's dtype; empty unless need_dresidual and a residual is given),
  // dresidual_scale = sum g * residual (empty without residual_scale).
  m.def("ext_scale_bias_act_backward(Tensor grad, Tensor? mask, Tensor y, Tensor scale, Tensor? residual, "
        "Tensor? residual_scale, bool need_dy, bool need_dresidual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The total gradient of a conv output whose batch statistics were taken:
  // grad_y + grad_mean / count + (y - mean) * grad_var * 2 / count, count = N*H*W; a missing
  // grad adds nothing. y's dtype and memory format. (With grad_y None: bn_stats' backward.)
  m.def("ext_conv_bn_stats_grad_y(Tensor? grad_y, Tensor y, Tensor mean, Tensor? grad_mean, Tensor? grad_var) "
        "-> Tensor");
  // A BatchNorm applied to a conv input: relu?(x * scale + shift).
  m.def("ext_prologue(Tensor x, Tensor scale, Tensor shift, bool relu) -> Tensor");
  // Its backward, recomputing the pre-activation p = x * scale + shift: g = grad_a where
  // not (relu and p <= 0). Returns (dx, dscale, dshift): dx = g * scale (x's dtype; empty
  // unless need_dx), dscale = sum g * x, dshift = sum g.
  m.def("ext_prologue_backward(Tensor grad_a, Tensor x, Tensor scale, Tensor shift, bool relu, bool need_dx) "
        "-> (Tensor, Tensor, Tensor)");
}
