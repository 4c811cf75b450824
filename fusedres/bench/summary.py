"""Short tables from saved results: `python -m fusedres.bench.summary DIR_OR_FILES...`.

Reads fusedres-bench JSON records (img/s per candidate and speedups over the baselines),
kernel benchmark records (`python -m fusedres.bench.kernels`) and pytest-benchmark JSON
from the per-block suite (median per candidate and the speedup of each fusedres backend
over eager and over torch.compile max-autotune).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

_SHORT = {"eager_nchw_fp32": "NCHW", "eager_cl": "eager", "compile": "compile",
          "compile_max_autotune": "max-autotune", "cudnn_fused": "cuDNN"}


def _files(args: list[str]) -> list[Path]:
    paths: list[Path] = []
    for a in args:
        p = Path(a)
        paths += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return paths


def cli_table(record: dict) -> list[str]:
    lines = []
    for run in record["runs"]:
        lines.append(f"-- {run['workload']['description']}")
        for c in run["candidates"]:
            if c["status"] != "ok":
                lines.append(f"   {c['label']:<46} {c['status']}")
                continue
            speed = " ".join(f"{v:.2f}x {_SHORT[k]}" for k, v in c["speedup"].items() if k != c["key"])
            roof = c.get("roofline_fraction")
            roof_text = f" {roof:.0%} roof" if roof is not None else ""
            lines.append(f"   {c['label']:<46} {c['img_per_s']:>9.1f} img/s{roof_text}  {speed}")
    return lines


def block_table(record: dict) -> list[str]:
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    for b in record["benchmarks"]:
        info = b["extra_info"]
        medians[b["group"]][info["candidate"]] = b["stats"]["median"] * 1000
    lines = [f"   {'block (device-shape-mode)':<52}{'eager ms':>9}  fusedres speedups"]
    ratios: dict[str, list[float]] = defaultdict(list)
    for group, by_cand in medians.items():
        eager = by_cand.get("eager")
        parts = []
        for cand, ms in by_cand.items():
            if not cand.startswith("fusedres_") or eager is None:
                continue
            parts.append(f"{cand.removeprefix('fusedres_')} {eager / ms:.2f}x")
            ratios[cand].append(eager / ms)
            if "compile_max_autotune" in by_cand:
                parts[-1] += f" ({by_cand['compile_max_autotune'] / ms:.2f}x m-a)"
        eager_text = f"{eager:>9.3f}" if eager is not None else f"{'-':>9}"
        lines.append(f"   {group:<52}{eager_text}  {', '.join(parts)}")
    for cand, rs in ratios.items():
        lines.append(f"   {cand}: geometric-mean speedup over eager {statistics.geometric_mean(rs):.2f}x "
                     f"over {len(rs)} blocks, slowest {min(rs):.2f}x")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m fusedres.bench.summary RESULTS_DIR_OR_JSON...")
    for path in _files(args):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"== {path.name}: unreadable ({e})")
            continue
        if "runs" in record:
            env = record["environment"]
            print(f"== {path.name}: {env.get('card') or env.get('cpu')} | torch {env['torch']}")
            print("\n".join(cli_table(record)))
        elif "rows" in record and "copy_bandwidth_GBps" in record:
            print(f"== {path.name}: fusedres._C kernels vs PyTorch ops, {record['device']}, {record['dtype']}, "
                  f"batch {record['batch']}")
            from fusedres.bench.kernels import format_row

            print("\n".join("   " + format_row(row) for row in record["rows"]))
        elif "benchmarks" in record:
            print(f"== {path.name}: per-block suite ({len(record['benchmarks'])} cases)")
            print("\n".join(block_table(record)))


if __name__ == "__main__":
    main()
