"""The rows of the benchmark: baselines and one fusedres candidate per backend.

Each candidate owns its model copy (and optimizer when training) and exposes `step()`,
one timed iteration: a forward pass under inference_mode, or forward + cross-entropy +
backward + SGD step. Inference runs models cast to the chosen dtype; training runs fp32
weights under autocast in the chosen dtype (AMP), as users train.

torch.compile baselines: `compile` (default mode), `compile_freezing` (default mode with
inductor freezing: weights become constants, so on the CPU they are prepacked for oneDNN
once at compile time; inference on the CPU only, the strongest CPU baseline) and
`compile_max_autotune` (max-autotune, with freezing for inference; GPU only: it autotunes
CUDA kernels, and on the CPU its GEMM autotuning takes long to compile for little gain).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres.bench.cudnn_fused import CudnnFusedResNet
from fusedres.bench.workload import MODELS, Workload, activate_fused_blocks
from fusedres.bench.workload import loss as workload_loss

BASELINES: tuple[str, ...] = ("eager_nchw_fp32", "eager_cl", "compile", "compile_freezing",
                              "compile_max_autotune", "cudnn_fused")
FUSEDRES_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "cuda")  # "auto": the default, tuned per shape
ALL_CANDIDATES: tuple[str, ...] = (*BASELINES, *(f"fusedres_{b}" for b in FUSEDRES_BACKENDS))
YARDSTICK = "eager_cl"  # PyTorch's own error in the chosen dtype sets the parity tolerance


@contextlib.contextmanager
def tf32(enabled: bool | None):
    """TF32 for cuDNN convolutions and matmuls on (True), off (False) or as it is (None)."""
    if enabled is None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class Runner:
    """One candidate, ready to run: `check()` once (parity, compilation), then `step()`."""

    def __init__(self, module: Callable, params: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                 mode: str, autocast_dtype: torch.dtype | None, tf32_enabled: bool | None = None,
                 compile_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.module = module
        self.loss = loss or (lambda out, labels: F.cross_entropy(out.float(), labels))
        self.params = params  # the nn.Module whose parameters train (not a compiled wrapper)
        self.x, self.labels, self.mode = x, labels, mode
        self.autocast_dtype = autocast_dtype
        self.tf32_enabled = tf32_enabled
        self.compile_context = compile_context or contextlib.nullcontext
        self.optimizer = None
        if mode == "training":
            self.optimizer = torch.optim.SGD(params.parameters(), lr=0.01, momentum=0.9)

    def _forward(self) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.module(self.x)
        with torch.autocast(self.x.device.type, dtype=self.autocast_dtype):
            return self.module(self.x)

    def _forward_backward(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        out = self._forward()
        self.loss(out, self.labels).backward()
        return out

    def step(self) -> None:
        with tf32(self.tf32_enabled):
            if self.mode == "inference":
                with torch.inference_mode():
                    self._forward()
            else:
                self._forward_backward()
                self.optimizer.step()

    def check(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The first call (compiles where needed): fp32 logits and, when training, gradients."""
        with tf32(self.tf32_enabled), self.compile_context():
            if self.mode == "inference":
                with torch.inference_mode():
                    return self._forward().float().clone(), {}
            out = self._forward_backward().detach().float().clone()
            grads = {n: p.grad.detach().float().clone() for n, p in self.params.named_parameters()
                     if p.grad is not None}
            return out, grads


@dataclass
class Candidate:
    key: str
    label: str
    kind: str  # "baseline" | "fusedres"
    build: Callable[[], Runner]
    unavailable: str | None = None  # why it cannot run here (then it is reported, not built)


def _dtype_label(work: Workload) -> str:
    if work.mode == "training" and work.dtype != "fp32":
        return f"{work.dtype} AMP"
    return work.dtype


def _low_precision_copy(model: nn.Module, work: Workload) -> nn.Module:
    """The model as the candidate runs it: channels_last, cast to the dtype for inference."""
    m = copy.deepcopy(model).to(work.device, memory_format=torch.channels_last)
    if work.mode == "inference":
        m = m.to(work.torch_dtype)
    return m.train(work.mode == "training")


def _inputs(work: Workload, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    return x.to(work.torch_dtype) if work.mode == "inference" else x


def _autocast(work: Workload) -> torch.dtype | None:
    return work.torch_dtype if work.mode == "training" and work.dtype != "fp32" else None


def build_candidates(model: nn.Module, work: Workload, x: torch.Tensor, labels: torch.Tensor,
                     wanted: tuple[str, ...]) -> list[Candidate]:
    """Every wanted candidate, in table order; those that cannot run here say why."""
    on_cuda = work.device.type == "cuda"
    dt = _dtype_label(work)
    x_cl = _inputs(work, x)
    train = work.mode == "training"
    loss = functools.partial(workload_loss, work.model)

    def cl_runner(module_fn: Callable[[nn.Module], Callable], compile_context=None) -> Callable[[], Runner]:
        def build() -> Runner:
            m = _low_precision_copy(model, work)
            return Runner(module_fn(m), m, x_cl, labels, work.mode, _autocast(work),
                          compile_context=compile_context, loss=loss)
        return build

    def eager_nchw() -> Runner:
        m = copy.deepcopy(model).to(work.device).train(train)
        return Runner(m, m, x, labels, work.mode, None, tf32_enabled=True if on_cuda else None, loss=loss)

    def freezing_context():
        # Freezing (constant-folding weights into the graph) applies to inference only. It is
        # decided when inductor compiles, i.e. at the first call, which check() makes inside this.
        import torch._inductor.config as inductor_config
        return inductor_config.patch(freezing=not train)

    def cudnn_fused() -> Runner:
        m = CudnnFusedResNet(copy.deepcopy(model).to(work.device).eval(), work.torch_dtype)
        return Runner(m, m, x_cl, labels, work.mode, None, loss=loss)

    def fusedres_runner(backend: str) -> Callable[[], Runner]:
        # convert() fuses torchvision's blocks; a fusedres CIFAR network's own blocks run fused again.
        return cl_runner(lambda m: activate_fused_blocks(fusedres.convert(m, backend=backend, inplace=True),
                                                         backend))

    torchvision_model = work.model in MODELS

    candidates = [
        Candidate("eager_nchw_fp32", "eager NCHW fp32" + (" (TF32)" if on_cuda else ""), "baseline", eager_nchw),
        Candidate("eager_cl", f"eager channels_last {dt}", "baseline", cl_runner(lambda m: m)),
        Candidate("compile", f"compile default, CL {dt}", "baseline", cl_runner(torch.compile)),
        # On a GPU freezing stays in the max-autotune row: one more compile there costs minutes.
        # Freezing goes in `options`, not only a config patch: dynamo reuses a graph compiled by an
        # equal backend (same mode and options), which would hand this row the unfrozen one.
        Candidate("compile_freezing", f"compile default+freezing, CL {dt}", "baseline",
                  cl_runner(lambda m: torch.compile(m, options={"freezing": True})),
                  "CPU only (on a GPU, freezing runs in compile max-autotune+freezing)" if on_cuda else
                  "inference only (inductor freezes weights only with autograd off)" if train else None),
        Candidate("compile_max_autotune", f"compile max-autotune{'' if train else '+freezing'}, CL {dt}",
                  "baseline", cl_runner(lambda m: torch.compile(m, mode="max-autotune"), freezing_context),
                  None if on_cuda else "GPU only (autotuning targets CUDA kernels; on the CPU, see compile "
                                       "default+freezing)"),
        Candidate("cudnn_fused", f"cuDNN conv+bias+add+relu (BN folded), CL {dt}", "baseline", cudnn_fused,
                  "torchvision's ResNets only" if not torchvision_model else
                  None if on_cuda and not train else
                  "inference on CUDA only (BN folds only with running statistics)"),
    ]
    candidates += [Candidate(f"fusedres_{b}", f"fusedres[{b}], CL {dt}", "fusedres", fusedres_runner(b))
                   for b in FUSEDRES_BACKENDS]
    return [c for c in candidates if c.key in wanted or c.key == YARDSTICK]
