"""`str(ParityReport)`: the report as plain-text tables (what `fusedres-check` prints)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fusedres.testing.report import NO_FUSED_OP, BlockInfo, Comparison

if TYPE_CHECKING:
    from fusedres.testing.report import ParityReport


def format_report(report: ParityReport, verbose: bool = False) -> str:
    lines = _header(report)
    lines += _coverage(report)
    lines += [f"note: {n}" for n in report.notes]
    lines += ["", *_backend_table(report.blocks, verbose)]
    lines += ["", *_comparison_table(report.comparisons, verbose)]
    lines += ["", *_verdict(report)]
    return "\n".join(lines)


def _header(report: ParityReport) -> list[str]:
    shapes = ", ".join(str(tuple(s)) for s in report.input_shapes)
    dtypes = "float64" if report.dtype == "float64" else f"float64 and {report.dtype}"
    steps = f"; {report.steps} SGD step(s) in train mode" if "train" in report.modes else ""
    lines = [f"fusedres parity check: {report.model}",
             f"inputs {shapes}; device {report.device}; backend {report.backend}; modes {', '.join(report.modes)}; "
             f"{dtypes}{steps}"]
    if report.environment:
        lines.append("; ".join(f"{k} {v}" for k, v in report.environment.items()))
    return lines


def _coverage(report: ParityReport) -> list[str]:
    lines = [f"fusion coverage: {report.coverage}"]
    for b in report.blocks:
        if not b.fused:
            lines.append(f"  not fused: {b.name} ({b.description}): {'; '.join(b.reasons) or 'no reason given'}")
    return lines


def _backend_table(blocks: Sequence[BlockInfo], verbose: bool) -> list[str]:
    runs: list[str] = []
    for b in blocks:
        runs += [r for r in b.backends if r not in runs]
    if not blocks:
        return ["backends: no block to report"]
    rows = [(b.name, "yes" if b.fused else "no", *(b.backends.get(r, "-") for r in runs)) for b in blocks]
    if not verbose:
        rows = _collapse(rows)
    header = ("block", "fused", *runs)
    lines = ["backend that ran each block's fused ops, per run:", *_render(header, rows)]
    if any(NO_FUSED_OP in row for row in rows):
        lines.append(f"  ({NO_FUSED_OP}: no fused op ran; the block's own PyTorch modules did, as the fused stem "
                     f"does in training)")
    return lines


def _collapse(rows: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Consecutive rows with the same columns after the name as one row: "a .. b (n)"."""
    out: list[tuple[str, ...]] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i < len(rows) and rows[i][1:] == rows[start][1:]:
            continue
        first, last, n = rows[start][0], rows[i - 1][0], i - start
        name = first if n == 1 else f"{first} .. {last} ({n})"
        out.append((name, *rows[start][1:]))
        start = i
    return out


def _comparison_table(comparisons: Sequence[Comparison], verbose: bool) -> list[str]:
    if not comparisons:
        return ["comparisons: none"]
    groups: dict[tuple[str, str, str], list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault((c.mode, c.dtype, c.group), []).append(c)
    header = ("mode", "dtype", "compared", "n", "worst tensor", "error", "bound", "torch error", "status")
    rows = []
    for (mode, dtype, group), items in groups.items():
        shown = items if verbose else [max(items, key=lambda c: c.ratio)]
        failed = sum(not c.ok for c in items)
        status = "ok" if not failed else f"FAIL ({failed})"
        for c in shown:
            rows.append((mode, dtype, group, str(len(items)) if not verbose else "", c.name, _num(c.error),
                         _num(c.bound), "-" if c.torch_error is None else _num(c.torch_error),
                         status if not verbose else ("ok" if c.ok else "FAIL")))
    return ["relative error per tensor against the float64 reference: max|fused - ref| / max|ref| in float64 runs, "
            "||fused - ref|| / ||ref|| in low-precision ones",
            "(low-precision bound: 2 x PyTorch's own error, the larger of its NCHW and channels_last runs, + 4 eps)",
            *_render(header, rows)]


def _verdict(report: ParityReport) -> list[str]:
    failures = report.failures
    n = len(report.comparisons)
    if not failures:
        return [f"PASS: {n} tensors within their bounds; {report.coverage}"]
    return [f"FAIL: {len(failures)} failure(s) ({sum(not c.ok for c in report.comparisons)} of {n} tensors "
            f"out of bounds); {report.coverage}", *(f"  - {f}" for f in failures)]


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    return ["  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in (header, *rows)]


def _num(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)
