"""Who runs an op: the backend registry and dispatch.

Every backend implements the same op set (`fusedres.backends.base.Backend`), each op
taking its typed inputs (`fusedres.backends.inputs`), and answers
`not_supported_reasons(inputs)` from the whole input: an empty list means it can run it.
The op layer (`fusedres.ops`) selects once per call and hands the chosen backend's name
to the op's fake, its autograd context and its backward.

* An explicit backend (`backend="triton"` on a block or op, or `FUSEDRES_BACKEND=triton`
  with `backend="auto"`: the two mean the same everywhere, tuner included) runs or raises
  `UnsupportedInputError` listing every reason.
* `auto` walks `AUTO_PRIORITY` and takes the first backend that can run the input. A
  backend that does not target the input's device is skipped silently; one that targets
  it but declines is reported in one warning per (op, device, reasons).
* "Never slower": on CUDA, when the caller asks for tuning and more than one backend can
  run the input, `auto` takes the measured winner for that shape
  (`fusedres.backends.tuning`; cached in memory and on disk).
"""

from __future__ import annotations

import os
import warnings

from fusedres.backends import tuning
from fusedres.backends.base import Backend, UnsupportedInputError
from fusedres.backends.cuda_backend import CudaBackend
from fusedres.backends.inputs import OpInputs
from fusedres.backends.torch_backend import TorchBackend
from fusedres.backends.triton_backend import TritonBackend

__all__ = [
    "AUTO_PRIORITY",
    "BACKENDS",
    "Backend",
    "UnsupportedInputError",
    "chosen_backend",
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


def chosen_backend(name: str, op: str) -> Backend:
    """The backend an op's body, fake and backward run: the one `fusedres.ops` chose for the
    call and passed on by name (choosing again there could disagree with the first choice)."""
    if name == "auto":
        raise ValueError(f"fusedres::{op} runs the backend fusedres.ops chose, not 'auto': call "
                         f"fusedres.ops.{op}(..., backend='auto'), which chooses one")
    return get_backend(name)


def select_backend(name: str, inputs: OpInputs, tune: bool = False) -> Backend:
    """The backend that runs `inputs`' op, following the rules in the module doc.

    `name` is a block's or op's `backend` ("auto" means $FUSEDRES_BACKEND where set).
    `tune=True` lets `auto` time the candidates on these inputs (they must be real tensors
    the op can run on).
    """
    name = resolve_backend_name(name)
    if name != "auto":
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(inputs)
        if reasons:
            raise UnsupportedInputError(
                f"fusedres: the {name!r} backend cannot run {inputs.op}: " + "; ".join(reasons)
                + ". Use backend='auto' to fall back to a backend that can."
            )
        return backend

    devices = inputs.device_types()
    device_type = devices[0] if devices else "cpu"
    declined: list[str] = []
    for candidate in AUTO_PRIORITY:
        backend = BACKENDS[candidate]
        if not backend.targets(device_type):
            continue
        reasons = backend.not_supported_reasons(inputs)
        if not reasons:
            if declined:
                _warn_once(inputs.op, device_type, f"fusedres: {inputs.op} runs on the {candidate!r} backend "
                           "because " + " | ".join(declined))
            if tune and tuning.wants_tuning(device_type):
                rivals = _also_capable(inputs, device_type, after=candidate)
                if rivals:
                    return tuning.TUNER.choose([backend, *rivals], inputs)
            return backend
        declined.append(f"{candidate}: " + "; ".join(reasons))
    raise UnsupportedInputError(f"fusedres: no backend can run {inputs.op}: " + " | ".join(declined))


def _also_capable(inputs: OpInputs, device_type: str, after: str) -> list[Backend]:
    """The backends after `after` in AUTO_PRIORITY that can run `inputs` too, one per
    implementation, the implementation's owner preferred (the cuda backend's eval
    convolution is the torch backend's code: timing it twice would measure nothing new)."""
    capable = [BACKENDS[n] for n in AUTO_PRIORITY[AUTO_PRIORITY.index(after) + 1:]
               if BACKENDS[n].targets(device_type) and not BACKENDS[n].not_supported_reasons(inputs)]
    by_implementation: dict[str, Backend] = {}
    for backend in capable:
        impl = backend.implementation(inputs)
        if impl not in by_implementation or backend.name == impl:
            by_implementation[impl] = backend
    by_implementation.pop(BACKENDS[after].implementation(inputs), None)
    return [b for b in capable if b in by_implementation.values()]


def _warn_once(op: str, device_type: str, message: str) -> None:
    key = (op, device_type, message)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
