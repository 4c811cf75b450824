"""Never slower: on a GPU, `auto` measures the backends that can run a shape and keeps the winner.

When `auto` finds several backends able to run an op on CUDA tensors (today: `triton` and
`torch`, i.e. our kernel against cuDNN through ATen with the same folded weights), the
`Tuner` looks the shape up:

1. in memory (a dict keyed by the exact call signature: cheap, per process);
2. on disk, one small JSON file per key in `cache_dir()`: $FUSEDRES_CACHE_DIR, else
   $XDG_CACHE_HOME/fusedres, else ~/.cache/fusedres; files live in its `dispatch/` folder,
   named by the sha256 of the key (card name, torch / triton / cuDNN / fusedres versions,
   op, dtype, shape and memory-format class of every tensor, conv arguments, flags);
3. otherwise it times every candidate on the actual inputs (a few ms each), stores the
   winner and logs one INFO line on the "fusedres" logger.

Several processes may tune at once: each writes a temp file in the same folder and
`os.replace`s it, so readers see a whole file or none; the last writer wins. Unreadable or
corrupt files, or a file holding another key, count as a miss and are rewritten.

It never times under torch.compile tracing, with fake tensors or while a CUDA graph is
being captured: it then takes the cached winner if there is one, else the first candidate
(triton). Under torch.compile the backend is chosen once, when the graph is traced (so run
the model once eagerly on the GPU first to tune it).

When the tuner runs (`wants_tuning`: CUDA tensors, `ENABLED`):

* `auto` choosing among backends, when more than one can run the input; an explicit
  backend (`backend="triton"` or $FUSEDRES_BACKEND=triton, which mean the same) is never
  raced against the others;
* the triton backend choosing its train-mode conv backward (ATen/cuDNN or its Triton
  dgrad/wgrad kernels) with FUSEDRES_TRITON_CONV_BACKWARD=auto (the default), however the
  triton backend was chosen.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fusedres.backends.inputs import OpInputs
from fusedres.backends.log import log, logger

ENABLED = True  # set False to always take the priority order
CACHE_FORMAT = 1
# Anything with a `name` and a method named after the op that takes the op's inputs: a
# Backend, or one of the triton backend's conv-backward implementations.
Candidate = Any
Timer = Callable[[str, Callable[[], object]], float]  # (backend name, run once) -> milliseconds


def cache_dir() -> Path:
    """Where tuning results live (the environment is read on every call)."""
    root = os.environ.get("FUSEDRES_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "fusedres")
    return Path(root) / "dispatch"


def cuda_timer(name: str, fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn` on the current CUDA stream, over a few ms of runs."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        try:
            return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))
        except TypeError:  # a triton without return_mode
            return float(do_bench(fn, warmup=5, rep=20))
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cuda_device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def _versions() -> dict[str, str | None]:
    import fusedres

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"torch": torch.__version__, "triton": triton_version, "cudnn": cudnn, "fusedres": fusedres.__version__,
            "cache_format": CACHE_FORMAT}


def _format_class(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def _describe(value: Any) -> Any:
    """A JSON-able description of one op argument: tensors by dtype, shape and format class."""
    if isinstance(value, torch.Tensor):
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "format": _format_class(value)}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    return value


def _flags() -> tuple:
    """Global switches that change what the candidates compute or how fast."""
    cudnn = torch.backends.cudnn
    return (cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32)


def _memory_key(op: str, args: Sequence[Any]) -> tuple:
    parts: list[Any] = [op, _flags()]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((a.device, a.dtype, tuple(a.shape), a.stride()))
        elif isinstance(a, list):
            parts.append(tuple(a))
        else:
            parts.append(a)
    return tuple(parts)


def tracing(*values: Any) -> bool:
    """Whether torch.compile is tracing, or any of `values` is a fake tensor: nothing can be
    timed or launched on them."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - private API moved
        return False
    return any(isinstance(v, FakeTensor) for v in values)


def _can_measure(args: Sequence[Any]) -> bool:
    """False under torch.compile tracing, with fake tensors and during CUDA graph capture."""
    if tracing(*args):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class Tuner:
    """Picks the fastest of several backends for one op call; see the module doc."""

    def __init__(self, timer: Timer | None = None, device_name: Callable[[torch.device], str] | None = None,
                 directory: str | os.PathLike | None = None) -> None:
        self.timer = timer or cuda_timer
        self.device_name = device_name or cuda_device_name
        self.directory = directory  # None: cache_dir(), read from the environment each time
        self._memory: dict[tuple, str] = {}
        self._device_names: dict[torch.device, str] = {}

    def folder(self) -> Path:
        return Path(self.directory) if self.directory is not None else cache_dir()

    def key(self, op: str, args: Sequence[Any], candidates: Sequence[str] = ()) -> dict[str, Any]:
        """The on-disk key: everything that can change which backend is faster."""
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device not in self._device_names:
            self._device_names[device] = self.device_name(device)
        allow_tf32, benchmark, deterministic, matmul_tf32 = _flags()
        return {"device": self._device_names[device], "versions": _versions(), "op": op,
                "candidates": list(candidates), "args": [_describe(a) for a in args],
                "flags": {"cudnn.allow_tf32": allow_tf32, "cudnn.benchmark": benchmark,
                          "cudnn.deterministic": deterministic, "matmul.allow_tf32": matmul_tf32}}

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.folder() / f"{key['op']}-{digest}.json"

    def choose(self, candidates: Sequence[Candidate], inputs: OpInputs) -> Candidate:
        """The fastest of `candidates` (in priority order) for `inputs`' op."""
        op, args = inputs.op, inputs.args()
        by_name = {b.name: b for b in candidates}
        memory_key = (tuple(by_name), *_memory_key(op, args))
        winner = self._memory.get(memory_key)
        if winner is None:
            key = self.key(op, args, list(by_name))
            path = self.path(key)
            winner = self._read(path, key, by_name)
            if winner is None:
                if not _can_measure(args):
                    return candidates[0]
                winner, times = self._measure(candidates, inputs)
                if winner is None:  # every candidate failed: let the first one raise for real
                    return candidates[0]
                where = self._write(path, key, winner, times)
                log(f"fusedres: tuned {op} {_short(key)}: "
                          + ", ".join(f"{n} {t:.4f} ms" for n, t in times.items())
                          + f" -> {winner} ({where})")
            self._memory[memory_key] = winner
        return by_name[winner]

    def _measure(self, candidates: Sequence[Candidate], inputs: OpInputs) -> tuple[str | None, dict[str, float]]:
        op = inputs.op
        times: dict[str, float] = {}
        with torch.no_grad():
            for backend in candidates:
                run = getattr(backend, op)

                def once(run=run):
                    return run(inputs)

                try:
                    once()  # compiles and autotunes Triton kernels outside the timing
                    times[backend.name] = float(self.timer(backend.name, once))
                except Exception as e:  # a backend that fails here just loses
                    logger.warning("fusedres: %s failed on the %r backend while tuning (%s: %s); it will not be "
                                   "used for this shape", op, backend.name, type(e).__name__, e)
        if not times:
            return None, times
        return min(times, key=times.__getitem__), times

    def _read(self, path: Path, key: dict[str, Any], by_name: dict[str, Candidate]) -> str | None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key)):
            return None
        winner = data.get("winner")
        return winner if isinstance(winner, str) and winner in by_name else None

    def _write(self, path: Path, key: dict[str, Any], winner: str, times: dict[str, float]) -> str:
        """Atomically (temp file + os.replace) store the result; returns where, for the log."""
        data = {"key": key, "winner": winner, "times_ms": times}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:24]}-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
            return f"cached in {path}"
        except OSError as e:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return f"not cached on disk: {e}"


def _short(key: dict[str, Any]) -> str:
    """The shape part of a key, compactly: 'H100 float16 x[8,64,56,56 cl] w[64,64,3,3] ...'."""
    parts = [key["device"]]
    for a in key["args"]:
        if isinstance(a, dict):
            fmt = {"contiguous": "", "channels_last": " cl", "strided": " strided"}[a["format"]]
            parts.append(f"{a['dtype']}[{','.join(map(str, a['shape']))}{fmt}]")
        elif a is None:
            parts.append("-")
        else:
            parts.append(str(a).replace(" ", ""))
    return " ".join(parts)


TUNER = Tuner()


def wants_tuning(device_type: str) -> bool:
    """Whether choices on `device_type` are measured (see the module doc)."""
    return ENABLED and device_type == "cuda"
