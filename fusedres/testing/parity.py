"""check_parity / assert_parity: the fused copy of a model against the original, in eval
and train mode, in float64 and in the dtype the model ships in.

Every run starts from private deep copies (the caller's model and inputs are never
touched): the reference is `fusedres.revert(model)` (the model's own torchvision / timm
blocks; a block that has no unfused counterpart runs its unfused forward), the fused model
is `fusedres.convert` of that.

Tolerances (module constants, the package's own test suite's):

* float64, relative to each tensor's max |value|: eval outputs EVAL_RTOL_FLOAT64 = 1e-10
  (tests/helpers.py RTOL: fused vs torchvision is ~2e-13 on ResNet-50 with randomised BN);
  train outputs, gradients and buffers TRAIN_RTOL_FLOAT64 = 1e-9 (tests/helpers.py
  TRAIN_RTOL, measured ~2e-12 after 3 steps with the same LOSS_SCALE).
* float32 / bfloat16 / float16: the original model run in that dtype is off the float64
  reference by some error of PyTorch's own; the fused model may be off by at most twice
  that, plus 4 eps of the dtype (tests/test_blocks.py's low-precision rule), per tensor.
  Two changes make that rule hold for whole networks in training, where it is otherwise a
  lottery: PyTorch's own error is the larger of the original model's errors run NCHW and
  run channels_last (two equally valid PyTorch executions), and the error is measured in
  the L2 norm, ||x - ref|| / ||ref||, not by the largest element. Why: low-precision
  training gradients of a deep network are dominated by ReLU decisions and BatchNorm batch
  statistics that rounding flips (ResNet-50, fp32, batch 2: gradients 1e-2 off float64),
  so the largest-element error of one run is one sample of a wide spread. Measured on
  ResNet-50 (224x224, batch 2, fp32, one SGD step, 4 seeds, 322 tensors each): with one
  NCHW PyTorch run and max-based errors, the fused model failed 2-13 tensors per seed,
  and PyTorch's own channels_last run failed 19-134; with the rule as used here the fused
  model failed none (worst error/bound 0.74), while a constant 1e-3 added to every block's
  output is still caught in every mode (tests/test_testing.py). The measurement:
  `python benchmarks/parity_tolerance.py`.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import fusedres
from fusedres.backends import UnsupportedInputError, check_backend_name
from fusedres.testing import coverage
from fusedres.testing.report import BlockInfo, Comparison, ParityReport

EVAL_RTOL_FLOAT64 = 1e-10
TRAIN_RTOL_FLOAT64 = 1e-9
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_EPS = 4.0
LOSS_SCALE = 1e-3  # keeps SGD steps small, so rounding differences are not amplified (tests/helpers.py)
LR = 0.01
MODES = ("eval", "train")
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ParityUsageError(ValueError):
    """The check cannot be run as asked (wrong inputs, a dtype or backend this machine
    cannot run); nothing about parity was decided."""


@dataclass
class _Config:
    backend: str
    modes: tuple[str, ...]
    dtype: torch.dtype | None  # the low-precision dtype, None for float64 only
    device: torch.device
    steps: int
    loss_fn: Callable[[Any], torch.Tensor] | None
    seed: int
    lr: float


@dataclass
class _Record:
    """The tensors one run produced, by (group, name)."""

    tensors: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    backends: dict[str, str] = field(default_factory=dict)


def check_parity(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any], *, backend: str = "auto",
                 modes: Sequence[str] = MODES, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, steps: int = 1,
                 loss_fn: Callable[[Any], torch.Tensor] | None = None, allow_unfused: bool = False,
                 seed: int = 0, lr: float = LR, name: str | None = None) -> ParityReport:
    """Check that `fusedres.convert(model)` computes what `model` computes, on `example_inputs`.

    eval: outputs (under torch.inference_mode, so the CPU inference plan runs as it does in
    production). train: after `steps` SGD steps (lr `lr`, no momentum) on `loss_fn(output)`
    (default: the outputs times a fixed seeded random projection, scaled by LOSS_SCALE), the
    last step's outputs, input gradients and every parameter gradient (by name), and every
    buffer (BN running statistics). Each in float64, and, when `dtype` is float32, bfloat16
    or float16, in that dtype against float64 (see the module doc for the bounds).

    The model and inputs are copied and moved to `device` (default: the model's); the model
    is never modified. Raises ParityUsageError (a ValueError) when the check cannot run:
    inputs whose channel count the model's first convolution does not take, a dtype the
    original model cannot run in on this device, a backend that cannot run the inputs.
    """
    config = _config(model, example_inputs, backend, modes, dtype, device, steps, loss_fn, seed, lr)
    inputs = _inputs(example_inputs, config.device)
    check_input_channels(model, inputs)
    base = fusedres.revert(model).to(config.device, torch.float64)
    fused_base, blocks, notes = coverage.convert_with_coverage(base, config.backend)
    report = _empty_report(name or type(model).__name__, inputs, config, blocks, notes, allow_unfused)
    reference_fused = coverage.force_unfused(base)
    if reference_fused:
        report.notes.append(f"{len(reference_fused)} block(s) have no unfused counterpart (e.g. "
                            f"{reference_fused[0]}); the reference runs their unfused forward")
    for mode in config.modes:
        _check_mode(report, mode, base, fused_base, inputs, config)
    return report


def assert_parity(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any], **kwargs: Any) -> ParityReport:
    """check_parity(...), raising an AssertionError that lists every failure (for a pytest suite)."""
    report = check_parity(model, example_inputs, **kwargs)
    report.raise_if_failed()
    return report


# ----- configuration ------------------------------------------------------------------


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a torch.dtype or a name ("float32", "bf16", ...) -> the low-precision dtype or None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ParityUsageError(f"unknown dtype {dtype!r}; expected one of float64, float32, bfloat16, float16")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise ParityUsageError(f"dtype {dtype} is not checked; expected float64, float32, bfloat16 or float16")
    return None if dtype == torch.float64 else dtype


def _config(model, example_inputs, backend, modes, dtype, device, steps, loss_fn, seed, lr) -> _Config:
    try:
        check_backend_name(backend)
    except ValueError as e:
        raise ParityUsageError(str(e)) from None
    modes = tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ParityUsageError(f"modes must be a non-empty subset of {MODES}, got {modes}")
    if steps < 1:
        raise ParityUsageError(f"steps must be at least 1, got {steps}")
    return _Config(backend, modes, parse_dtype(dtype), _device(model, example_inputs, device), steps, loss_fn,
                   seed, lr)


def _device(model: nn.Module, example_inputs, device) -> torch.device:
    if device is None:
        tensor = next(model.parameters(), None)
        if tensor is None:
            tensor = next((t for t in _as_tuple(example_inputs) if isinstance(t, torch.Tensor)), None)
        device = tensor.device if tensor is not None else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParityUsageError(f"device {device}: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _inputs(example_inputs, device: torch.device) -> tuple:
    """The positional inputs, floating tensors in float64 on `device` (others as they are)."""
    out = []
    for x in _as_tuple(example_inputs):
        if isinstance(x, torch.Tensor):
            x = x.detach().to(device)
            if x.is_floating_point():
                x = x.to(torch.float64)
        out.append(x)
    if not any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in out):
        raise ParityUsageError("example_inputs must hold at least one floating-point tensor")
    return tuple(out)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The model's first nn.Conv2d in registration order (the one that sees the image)."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def check_input_channels(model: nn.Module, inputs: Sequence[Any]) -> None:
    """ParityUsageError naming the expected shape when the first input's channels are not
    what the model's first convolution takes."""
    conv = first_conv(model)
    x = inputs[0] if inputs else None
    if conv is None or not isinstance(x, torch.Tensor):
        return
    name, module = conv
    if x.dim() != 4 or x.shape[1] != module.in_channels:
        c = module.in_channels
        raise ParityUsageError(f"the model's first convolution ({name}) takes {c} input channels: expected inputs "
                               f"of shape (N, {c}, H, W), got {tuple(x.shape)}")


def _empty_report(name: str, inputs: tuple, config: _Config, blocks: list[BlockInfo], notes: list[str],
                  allow_unfused: bool) -> ParityReport:
    dtype = "float64" if config.dtype is None else str(config.dtype).removeprefix("torch.")
    tolerances = {"float64_eval_rtol": EVAL_RTOL_FLOAT64, "float64_train_rtol": TRAIN_RTOL_FLOAT64,
                  "low_precision": f"error <= {LOW_PRECISION_FACTOR:g} * torch_error + {LOW_PRECISION_EPS:g} * eps "
                                   "(L2-norm relative errors; torch_error: the larger of PyTorch's NCHW and "
                                   "channels_last runs)",
                  "loss_scale": LOSS_SCALE, "lr": config.lr}
    if config.dtype is not None:
        tolerances["eps"] = torch.finfo(config.dtype).eps
    environment = {"torch": torch.__version__, "fusedres": fusedres.__version__,
                   "python": sys.version.split()[0], "extension": _extension_status()}
    return ParityReport(model=name, input_shapes=[tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
                        backend=config.backend, device=str(config.device), dtype=dtype, modes=config.modes,
                        steps=config.steps, blocks=blocks, notes=list(notes), allow_unfused=allow_unfused,
                        tolerances=tolerances, environment=environment)


def _extension_status() -> str:
    from fusedres import ext

    return "loaded" if not ext.load_error() else "not loaded"


# ----- running ------------------------------------------------------------------------


def _check_mode(report: ParityReport, mode: str, base: nn.Module, fused_base: nn.Module, inputs: tuple,
                config: _Config) -> None:
    """The float64 run, and the low-precision one, of one mode; results added to `report`."""
    low = config.dtype
    torch_low = [] if low is None else [_reference_run(base, mode, low, inputs, config, channels_last=cl)
                                        for cl in (False, True)]
    exact = _reference_run(base, mode, torch.float64, inputs, config)
    runs = [(torch.float64, [])] + ([(low, torch_low)] if low is not None else [])
    for dtype, torch_records in runs:
        ours = _fused_run(report, fused_base, mode, dtype, inputs, config)
        if ours is not None:
            report.comparisons += compare(mode, dtype, exact, ours, torch_records)


def _run_key(mode: str, dtype: torch.dtype) -> str:
    return f"{mode} {str(dtype).removeprefix('torch.')}"


def _reference_run(base: nn.Module, mode: str, dtype: torch.dtype, inputs: tuple, config: _Config,
                   channels_last: bool = False) -> _Record:
    """The original model's run (model and 4-D inputs channels_last if asked); an error
    here is the caller's (ParityUsageError)."""
    try:
        return _run(base, mode, dtype, inputs, config, record_backends=False, channels_last=channels_last)
    except Exception as e:  # whatever the user's model raises, said in one line
        hint = ""
        if dtype in (torch.float16, torch.bfloat16) and inputs[0].device.type == "cpu":
            hint = f" (this PyTorch build or CPU may not run {str(dtype).removeprefix('torch.')} {mode} on the CPU)"
        raise ParityUsageError(f"the original model cannot run {_run_key(mode, dtype)} on {inputs[0].device}"
                               f"{hint}: {type(e).__name__}: {_first_line(e)}") from e


def _fused_run(report: ParityReport, fused_base: nn.Module, mode: str, dtype: torch.dtype, inputs: tuple,
               config: _Config) -> _Record | None:
    """The fused model's run; an exception is a failure of the check (recorded), except a
    backend that cannot run these inputs at all (ParityUsageError)."""
    key = _run_key(mode, dtype)
    try:
        with _captured_messages(report.notes):
            record = _run(fused_base, mode, dtype, inputs, config, record_backends=True)
    except UnsupportedInputError as e:
        raise ParityUsageError(f"{key}: {_first_line(e)}") from e
    except Exception as e:  # the fused model failing is what the check reports
        report.errors.append(f"{key}: the fused model raised {type(e).__name__}: {_first_line(e)}")
        return None
    by_name = {b.name: b for b in report.blocks}
    for name, label in record.backends.items():
        if name in by_name:
            by_name[name].backends[key] = label
    return record


def _run(base: nn.Module, mode: str, dtype: torch.dtype, inputs: tuple, config: _Config,
         record_backends: bool, channels_last: bool = False) -> _Record:
    model = copy.deepcopy(base).to(dtype)
    xs = tuple(x.to(dtype) if _is_float(x) else x for x in inputs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        xs = tuple(x.contiguous(memory_format=torch.channels_last) if _is_float(x) and x.dim() == 4 else x
                   for x in xs)
    recorder = coverage.BackendRecorder(model) if record_backends else None
    record = _eval(model, xs, recorder) if mode == "eval" else _train(model, xs, config, recorder)
    if recorder is not None:
        record.backends = recorder.labels()
    return record


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _eval(model: nn.Module, xs: tuple, recorder: coverage.BackendRecorder | None) -> _Record:
    model.eval()
    with torch.inference_mode(), _maybe(recorder):
        out = model(*xs)
    return _Record({("output", name): t.clone() for name, t in _named_tensors(out, "output")})


def _train(model: nn.Module, xs: tuple, config: _Config, recorder: coverage.BackendRecorder | None) -> _Record:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    loss_fn = config.loss_fn or _ProjectionLoss(config.seed)
    record = _Record()
    for step in range(config.steps):
        leaves = tuple(x.detach().clone().requires_grad_(True) if _is_float(x) else x for x in xs)
        opt.zero_grad(set_to_none=True)
        with _seeded(config.seed + step, config.device), _maybe(recorder):
            out = model(*leaves)
        loss_fn(out).backward()
        if step == config.steps - 1:
            record.tensors.update(_step_tensors(model, out, leaves))
        opt.step()
    record.tensors.update({("buffer", n): b.detach().clone() for n, b in model.named_buffers()})
    return record


def _step_tensors(model: nn.Module, out: Any, leaves: tuple) -> dict[tuple[str, str], torch.Tensor]:
    tensors = {("output", n): t.detach().clone() for n, t in _named_tensors(out, "output")}
    floats = [x for x in leaves if _is_float(x)]
    for i, x in enumerate(floats):
        if x.grad is not None:
            tensors["input grad", "input" if len(floats) == 1 else f"input[{i}]"] = x.grad.detach().clone()
    for n, p in model.named_parameters():
        if p.grad is not None:
            tensors["parameter grad", n] = p.grad.detach().clone()
    return tensors


class _ProjectionLoss:
    """sum(output * P) * LOSS_SCALE with P fixed and seeded, the same in every run and dtype
    (drawn in float64, then cast), so every output element gets a non-trivial gradient."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.projections: dict[str, torch.Tensor] = {}

    def __call__(self, out: Any) -> torch.Tensor:
        total = None
        for name, t in _named_tensors(out, "output"):
            if not t.is_floating_point() or not t.requires_grad:
                continue
            p = self.projections.get(name)
            if p is None:
                gen = torch.Generator().manual_seed(self.seed + len(self.projections))
                p = self.projections[name] = torch.randn(t.shape, generator=gen, dtype=torch.float64) * LOSS_SCALE
            term = (t * p.to(t.device, t.dtype)).sum()
            total = term if total is None else total + term
        if total is None:
            raise ParityUsageError("the model's output holds no floating-point tensor that requires grad")
        return total


def _named_tensors(out: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors in an output (a tensor, or tuples / lists / dicts of them), with names."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):
        items = out.items()
    elif isinstance(out, (tuple, list)):
        items = enumerate(out)
    else:
        return []
    named = []
    for key, value in items:
        named += _named_tensors(value, f"{prefix}[{key!r}]" if isinstance(key, str) else f"{prefix}[{key}]")
    return named


class _maybe:
    """`with recorder:` when there is one."""

    def __init__(self, recorder: coverage.BackendRecorder | None) -> None:
        self.recorder = recorder

    def __enter__(self):
        if self.recorder is not None:
            self.recorder.__enter__()

    def __exit__(self, *exc):
        if self.recorder is not None:
            return self.recorder.__exit__(*exc)
        return False


class _seeded:
    """The global RNG seeded for one forward (dropout, stochastic depth: the same draws in
    every run), and restored afterwards."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = seed
        devices = [device] if device.type == "cuda" else []
        self.fork = torch.random.fork_rng(devices=devices)

    def __enter__(self):
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


class _captured_messages:
    """Warnings and "fusedres" log records emitted during a fused run, added to `notes` once each."""

    def __init__(self, notes: list[str]) -> None:
        self.notes = notes
        self.handler = _ListHandler()
        self.warnings = warnings.catch_warnings(record=True)

    def __enter__(self):
        self.caught = self.warnings.__enter__()
        warnings.simplefilter("always")
        logging.getLogger("fusedres").addHandler(self.handler)

    def __exit__(self, *exc):
        logging.getLogger("fusedres").removeHandler(self.handler)
        self.warnings.__exit__(*exc)
        for message in [str(w.message) for w in self.caught] + self.handler.messages:
            if message not in self.notes:
                self.notes.append(message)
        return False


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


# ----- comparing ----------------------------------------------------------------------


def relative_error(actual: torch.Tensor, expected: torch.Tensor, norm: bool = False) -> tuple[float, str]:
    """(max|actual - expected| / max|expected|, "") or (inf, why): the error of a reduction
    scales with the whole tensor's magnitude, not each element's (tests/helpers.py
    assert_close_scaled). `norm=True`: ||actual - expected||_2 / ||expected||_2 instead (the
    low-precision runs; see the module doc). Absolute where expected is all zeros; integer
    tensors: max|diff|. NaN / Inf must sit at the same places with the same values."""
    if actual.shape != expected.shape:
        return math.inf, f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0.0, ""
    a, e = actual.detach().double(), expected.detach().double()
    if not expected.is_floating_point():
        return (a - e).abs().max().item(), ""
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return math.inf, "NaN positions differ from the reference"
    special = ~torch.isfinite(e)
    if not torch.equal(a[special & ~torch.isnan(e)], e[special & ~torch.isnan(e)]) or not torch.isfinite(
            a[~special]).all():
        return math.inf, "Inf positions or signs differ from the reference"
    d, e = (a - e).masked_fill(special, 0), e.masked_fill(special, 0)
    diff, scale = (d.norm().item(), e.norm().item()) if norm else (d.abs().max().item(), e.abs().max().item())
    return (diff / scale if scale > 0 else diff), ""


def compare(mode: str, dtype: torch.dtype, exact: _Record, ours: _Record,
            torch_records: Sequence[_Record] = ()) -> list[Comparison]:
    """One Comparison per tensor of the float64 reference (and per tensor only `ours` has):
    float64 runs (no `torch_records`) at the float64 bound, low-precision runs by the rule
    with PyTorch's own error the larger of `torch_records`' (the module doc)."""
    name = str(dtype).removeprefix("torch.")
    low = bool(torch_records)
    out = []
    for key, expected in exact.tensors.items():
        group, tensor_name = key
        actual = ours.tensors.get(key)
        if actual is None:
            out.append(Comparison(mode, name, group, tensor_name, math.inf, 0.0,
                                  detail="present in the reference, missing in the fused model"))
            continue
        error, detail = relative_error(actual, expected, norm=low)
        torch_error = max(relative_error(r.tensors[key], expected, norm=True)[0] for r in torch_records) \
            if low else None
        out.append(Comparison(mode, name, group, tensor_name, error, _bound(mode, dtype, expected, torch_error),
                              torch_error, detail, metric="l2" if low else "max"))
    for group, tensor_name in ours.tensors.keys() - exact.tensors.keys():
        out.append(Comparison(mode, name, group, tensor_name, math.inf, 0.0,
                              detail="present in the fused model, missing in the reference"))
    return out


def _bound(mode: str, dtype: torch.dtype, expected: torch.Tensor, torch_error: float | None) -> float:
    if not expected.is_floating_point():
        return 0.0  # integer buffers (num_batches_tracked) must be equal
    if torch_error is None:
        return EVAL_RTOL_FLOAT64 if mode == "eval" else TRAIN_RTOL_FLOAT64
    return LOW_PRECISION_FACTOR * torch_error + LOW_PRECISION_EPS * torch.finfo(dtype).eps
