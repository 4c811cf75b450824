"""Who runs an op: the backend registry and dispatch.

Every backend implements the same op set (see `fusedres.ops`) and answers
`not_supported_reasons(op, tensors)` (the op's tensor arguments in order, None for an
absent optional one): an empty list means it can run that input.

* An explicit backend (`backend="triton"` on a block, or `FUSEDRES_BACKEND=triton`)
  runs or raises `UnsupportedInputError` listing every reason.
* `auto` walks `AUTO_PRIORITY` and takes the first backend that can run the input. A
  backend that does not target the input's device is skipped silently; one that targets
  it but declines is reported in one warning per (op, device, reasons).
* "Never slower": on CUDA, when the caller passes the op's arguments and more than one
  backend can run them, `auto` takes the measured winner for that shape
  (`fusedres.backends.tuning`; cached in memory and on disk).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from fusedres.backends import tuning
from fusedres.backends.base import Backend, UnsupportedInputError
from fusedres.backends.cuda_backend import CudaBackend
from fusedres.backends.torch_backend import TorchBackend
from fusedres.backends.triton_backend import TritonBackend

__all__ = [
    "AUTO_PRIORITY",
    "BACKENDS",
    "Backend",
    "UnsupportedInputError",
    "get_backend",
    "resolve_backend_name",
    "select_backend",
]

BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CudaBackend(), TorchBackend())}
AUTO_PRIORITY: tuple[str, ...] = ("triton", "cuda", "torch")
VALID_NAMES: tuple[str, ...] = ("auto", *BACKENDS)
ENV_VAR = "FUSEDRES_BACKEND"

_warned: set[tuple[str, str, str]] = set()


def check_backend_name(name: str, source: str = "backend") -> str:
    if name not in VALID_NAMES:
        raise ValueError(f"fusedres: unknown {source} {name!r}; expected one of {', '.join(VALID_NAMES)}")
    return name


def resolve_backend_name(name: str) -> str:
    """A block's `backend` setting, with "auto" replaced by $FUSEDRES_BACKEND when set."""
    check_backend_name(name)
    if name == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            return check_backend_name(env, f"{ENV_VAR} value")
    return name


def get_backend(name: str) -> Backend:
    check_backend_name(name)
    if name == "auto":
        raise ValueError("fusedres: 'auto' is not a backend; use select_backend()")
    return BACKENDS[name]


def select_backend(name: str, op: str, tensors: Sequence[torch.Tensor | None],
                   args: Sequence[Any] | None = None) -> Backend:
    """The backend that runs `op` on `tensors`, following the rules in the module doc.

    `args` (the op's arguments, without `backend`) lets `auto` time the candidates on them.
    """
    present = [t for t in tensors if t is not None]
    if name != "auto":
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(op, tensors)
        if reasons:
            raise UnsupportedInputError(
                f"fusedres: the {name!r} backend cannot run {op}: " + "; ".join(reasons)
                + ". Use backend='auto' to fall back to a backend that can."
            )
        return backend

    device_type = present[0].device.type if present else "cpu"
    declined: list[str] = []
    for candidate in AUTO_PRIORITY:
        backend = BACKENDS[candidate]
        if not backend.targets(device_type):
            continue
        reasons = backend.not_supported_reasons(op, tensors)
        if not reasons:
            if declined:
                _warn_once(op, device_type, f"fusedres: {op} runs on the {candidate!r} backend because "
                           + " | ".join(declined))
            if args is not None and tuning.wants_tuning(device_type):
                rivals = _also_capable(op, tensors, device_type, after=candidate)
                if rivals:
                    return tuning.TUNER.choose(op, [backend, *rivals], args)
            return backend
        declined.append(f"{candidate}: " + "; ".join(reasons))
    raise UnsupportedInputError(f"fusedres: no backend can run {op}: " + " | ".join(declined))


def _also_capable(op: str, tensors: Sequence[torch.Tensor | None], device_type: str, after: str) -> list[Backend]:
    """The backends after `after` in AUTO_PRIORITY that can run `op` on `tensors` too, one
    per implementation, the implementation's owner preferred (the cuda backend's eval
    convolution is the torch backend's code: timing it twice would measure nothing new)."""
    capable = [BACKENDS[n] for n in AUTO_PRIORITY[AUTO_PRIORITY.index(after) + 1:]
               if BACKENDS[n].targets(device_type) and not BACKENDS[n].not_supported_reasons(op, tensors)]
    by_implementation: dict[str, Backend] = {}
    for backend in capable:
        impl = backend.implementation(op)
        if impl not in by_implementation or backend.name == impl:
            by_implementation[impl] = backend
    by_implementation.pop(BACKENDS[after].implementation(op), None)
    return [b for b in capable if b in by_implementation.values()]


def _warn_once(op: str, device_type: str, message: str) -> None:
    key = (op, device_type, message)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
