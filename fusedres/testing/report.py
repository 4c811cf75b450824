"""What a parity check found: one `Comparison` per compared tensor, one `BlockInfo` per
block, and the `ParityReport` that holds them (readable table, JSON, pass/fail)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# The label of a run in which a block ran no fused op: its own PyTorch modules ran (the
# fused stem trains this way, and a fused block whose parts are not the standard ones).
NO_FUSED_OP = "modules"


@dataclass
class Comparison:
    """One tensor of the fused model against the float64 reference.

    `error` is max|ours - reference| / max|reference| in float64 runs (`metric` "max") and
    ||ours - reference|| / ||reference|| (L2) in low-precision ones (`metric` "l2"); absolute
    where the reference is all zeros; integer tensors: max|difference|, bound 0.
    `torch_error` is the same for the original model run in the low-precision dtype (the
    larger of its NCHW and channels_last runs; None in float64 runs), from which `bound` =
    2 * torch_error + 4 * eps(dtype) was derived.
    """

    mode: str
    dtype: str
    group: str  # "output", "input grad", "parameter grad", "buffer"
    name: str
    error: float
    bound: float
    torch_error: float | None = None
    detail: str = ""  # why the error is infinite: shapes, NaN positions, a tensor on one side only
    metric: str = "max"  # "max" (largest element) or "l2" (norm)

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    @property
    def ratio(self) -> float:
        """error / bound: how close to failing (above 1: failed)."""
        if self.bound > 0:
            return self.error / self.bound
        return 0.0 if self.error == 0 else math.inf

    def describe(self) -> str:
        what = f"{self.mode} {self.dtype} {self.group} {self.name}"
        if self.detail:
            return f"{what}: {self.detail}"
        relation = "<=" if self.ok else ">"
        text = f"{what}: relative error {_num(self.error)} {relation} bound {_num(self.bound)}"
        if self.torch_error is not None:
            text += f" (2 x PyTorch's own {self.dtype} error {_num(self.torch_error)} + 4 eps; L2 norms)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "dtype": self.dtype, "group": self.group, "name": self.name,
                "error": _json_float(self.error), "bound": _json_float(self.bound),
                "torch_error": None if self.torch_error is None else _json_float(self.torch_error),
                "metric": self.metric, "ok": self.ok, "detail": self.detail}


@dataclass
class BlockInfo:
    """A residual block (or the stem) of the model: fused or not, why not, and which backend
    ran its fused ops in each run ("eval float64" -> "torch", ...)."""

    name: str
    description: str
    fused: bool
    reasons: list[str] = field(default_factory=list)
    kind: str = "block"  # or "stem"
    backends: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "kind": self.kind, "fused": self.fused,
                "reasons": list(self.reasons), "backends": dict(self.backends)}


@dataclass
class ParityReport:
    """The result of `fusedres.testing.check_parity`.

    `ok` is True when every compared tensor is within its bound, no fused run raised, and
    at least one block was fused (or `allow_unfused` was given). `raise_if_failed()` raises
    an AssertionError listing every failure; `str(report)` is a table, `to_dict()` JSON.
    """

    model: str
    input_shapes: list[tuple[int, ...]]
    backend: str
    device: str
    dtype: str  # the low-precision dtype checked besides float64, or "float64"
    modes: tuple[str, ...]
    steps: int
    blocks: list[BlockInfo] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # a fused run that raised
    notes: list[str] = field(default_factory=list)
    allow_unfused: bool = False
    tolerances: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)

    # ----- coverage -------------------------------------------------------------------

    @property
    def residual_blocks(self) -> list[BlockInfo]:
        return [b for b in self.blocks if b.kind == "block"]

    @property
    def fused_count(self) -> int:
        return sum(b.fused for b in self.residual_blocks)

    @property
    def coverage(self) -> str:
        """"16 of 16 blocks fused, stem fused", or with the blocks left unfused named."""
        blocks = self.residual_blocks
        text = f"{self.fused_count} of {len(blocks)} blocks fused"
        stems = [b for b in self.blocks if b.kind == "stem"]
        if stems:
            text += ", stem " + ("fused" if all(s.fused for s in stems) else "not fused")
        return text

    # ----- verdict --------------------------------------------------------------------

    @property
    def failures(self) -> list[str]:
        """Every reason the check failed, one line each."""
        lines = [c.describe() for c in self.comparisons if not c.ok]
        lines += self.errors
        if self.fused_count == 0 and not self.allow_unfused:
            lines.append(f"{self.coverage}: nothing was fused, so nothing fused was checked "
                         f"(allow_unfused=True / --allow-unfused accepts that)")
        if not self.comparisons and not self.errors:
            lines.append("no tensor was compared")
        return lines

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_if_failed(self) -> None:
        """AssertionError listing every failure (for pytest: the message is the whole story)."""
        failures = self.failures
        if failures:
            raise AssertionError(f"fusedres parity check of {self.model} failed ({len(failures)} failure(s); "
                                 f"{self.coverage}):\n" + "\n".join(f"  - {f}" for f in failures))

    # ----- output ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report, JSON-serialisable (non-finite numbers as strings)."""
        return {
            "ok": self.ok,
            "model": self.model,
            "input_shapes": [list(s) for s in self.input_shapes],
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "modes": list(self.modes),
            "steps": self.steps,
            "coverage": {"summary": self.coverage, "fused": self.fused_count, "blocks": len(self.residual_blocks)},
            "blocks": [b.to_dict() for b in self.blocks],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "failures": self.failures,
            "errors": list(self.errors),
            "notes": list(self.notes),
            "tolerances": dict(self.tolerances),
            "environment": dict(self.environment),
        }

    def __str__(self) -> str:
        return self.format()

    def format(self, verbose: bool = False) -> str:
        """The readable report: header, coverage, backends per block, one row per compared
        group (worst tensor shown) and every failure; `verbose` lists every block and tensor."""
        from fusedres.testing import table

        return table.format_report(self, verbose)


def _num(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
