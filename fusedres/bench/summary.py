"""Short tables from saved results: `python -m fusedres.bench.summary DIR_OR_FILES...`.

Reads fusedres-bench JSON records (img/s per candidate, speedups over the baselines, first-call
seconds), kernel benchmark records (`python -m fusedres.bench.kernels`), pytest-benchmark
JSON from the per-block suite (median per candidate and the speedup of each fusedres backend
over eager and over torch.compile max-autotune) and `fusedres.bench.tune` records. A folder
written by benchmarks/gpu_check.sh also gives, first: its stages (stages.tsv: rc, seconds,
cap), the smoke results (smoke.txt), the never-slower tuner's measurements (one JSON per
shape under any `dispatch/` folder: every candidate's time and the winner) and the size of
each Triton cache (triton-cache-*.txt listings).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

_SHORT = {"eager_nchw_fp32": "NCHW", "eager_cl": "eager", "compile": "compile",
          "compile_freezing": "compile+freezing", "compile_max_autotune": "max-autotune", "cudnn_fused": "cuDNN"}


def _files(args: list[str]) -> list[Path]:
    paths: list[Path] = []
    for a in args:
        p = Path(a)
        paths += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return paths


def _first_call(c: dict) -> str:
    if "first_call_s" not in c:
        return ""
    warm = c.get("first_call_caches", {})
    filled = warm.get("triton_cache_files") or warm.get("tuner_cache_files") or warm.get("inductor_cache_files")
    state = "warm" if filled else "cold"
    after = f", after {'+'.join(warm['after_in_process'])}" if warm.get("after_in_process") else ""
    return f"  first call {c['first_call_s']:.1f} s ({state} caches{after})" if warm else \
        f"  first call {c['first_call_s']:.1f} s"


def cli_table(record: dict) -> list[str]:
    lines = []
    for run in record["runs"]:
        lines.append(f"-- {run['workload']['description']}")
        for c in run["candidates"]:
            if c["status"] != "ok":
                reason = " ".join(str(c.get("reason", "")).split())
                lines.append(f"   {c['label']:<46} {c['status']}: {reason[:150]}{_first_call(c)}")
                continue
            speed = " ".join(f"{v:.2f}x {_SHORT[k]}" for k, v in c["speedup"].items() if k != c["key"])
            roof = c.get("roofline_fraction")
            roof_text = f" {roof:.0%} roof" if roof is not None else ""
            lines.append(f"   {c['label']:<46} {c['img_per_s']:>9.1f} img/s{roof_text}  {speed}{_first_call(c)}")
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


def stage_table(path: Path) -> list[str]:
    """stages.tsv (name, rc, seconds, cap, note per line; rc "-" = started, never finished)."""
    lines = [f"   {'stage':<18}{'result':<10}{'rc':>5}{'seconds':>9}{'cap':>6}  note"]
    for row in path.read_text().splitlines():
        name, rc, seconds, cap, note = (row.split("\t") + [""] * 5)[:5]
        if rc == "-":
            result = "CUT"  # started; the run ended (killed) before it did
        elif rc == "skip":
            result = "SKIPPED"
        else:
            result = "ok" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else "FAILED")
        lines.append(f"   {name:<18}{result:<10}{rc:>5}{seconds:>9}{cap:>6}  {note}")
    return lines


def smoke_table(path: Path) -> list[str]:
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    counts = {s: sum(line.startswith(s) for line in rows) for s in ("PASS", "FAIL", "UNAVAILABLE")}
    lines = ["   " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(rows)} cases"]
    return lines + ["   " + (line if len(line) <= 220 else line[:217] + "...") for line in rows]


def _arg_text(a: object) -> str:
    if isinstance(a, dict) and "shape" in a:
        return "x".join(map(str, a["shape"]))
    return "-" if a is None else str(a).replace(" ", "")


def _dispatch_rows(folder: Path) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(folder.glob("*.json")):
        try:
            data = json.loads(f.read_text())
            key, times = data["key"], data["times_ms"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rows.append({"op": key["op"], "args": key["args"], "times": times, "winner": data.get("winner"),
                     "device": key.get("device"), "candidates": key.get("candidates") or sorted(times)})
    return rows


def dispatch_table(folder: Path) -> list[str]:
    """The never-slower tuner's measured time of every candidate per tuned shape, and the winner.

    conv_bias_act (eval conv + folded BN (+ residual / shortcut) + ReLU): triton = the fused
    Triton conv, torch = cuDNN through ATen on the same folded weights. conv_backward (train
    convs, dgrad and wgrad in one call): triton = the Triton dgrad/wgrad kernels, aten = ATen's
    convolution_backward (cuDNN)."""
    rows = _dispatch_rows(folder)
    if not rows:
        return ["   no tuner results (the tuner times candidates on CUDA only)"]
    lines = []
    for op in sorted({r["op"] for r in rows}):
        mine = [r for r in rows if r["op"] == op]
        names = list(dict.fromkeys(n for r in mine for n in r["candidates"]))
        if op == "conv_bias_act":
            head = f"{'x':<18}{'weight':<16}{'stride':<7}{'extra':<20}"
        else:
            head = f"{'x (input)':<18}{'weight':<16}{'stride':<7}{'need dx,dw':<20}"
        lines.append(f"-- {op} ({len(mine)} shapes, {mine[0]['device']}, {mine[0]['args'][0].get('dtype')})")
        lines.append("   " + head + "".join(f"{n + ' ms':>12}" for n in names) + f"{'winner':>9}{'triton/other':>14}")
        ratios = []
        for r in sorted(mine, key=lambda r: (r["args"][1].get("shape", [0]), r["args"][0].get("shape", [0]))):
            a = r["args"]
            if op == "conv_bias_act":
                x, w, stride = a[0], a[1], a[6]
                extra = "+res" * (a[3] is not None) + (f"+shortcut {_arg_text(a[5])}" if a[5] is not None else "")
            else:
                x, w, stride = a[1], a[2], a[3]
                extra = f"{a[7]},{a[8]}"
            line = f"   {_arg_text(x):<18}{_arg_text(w):<16}{_arg_text(stride):<7}{extra:<20}"
            line += "".join(f"{r['times'][n]:>12.4f}" if n in r["times"] else f"{'-':>12}" for n in names)
            others = [t for n, t in r["times"].items() if n != "triton"]
            ratio = r["times"]["triton"] / min(others) if "triton" in r["times"] and others else None
            if ratio:
                ratios.append(ratio)
            lines.append(line + f"{str(r['winner']):>9}" + (f"{ratio:>13.2f}x" if ratio else f"{'-':>14}"))
        wins = sum(r["winner"] == "triton" for r in mine)
        total = {n: sum(r["times"].get(n, float("nan")) for r in mine) for n in names}
        best = sum(min(r["times"].values()) for r in mine)
        mean = f"; geometric-mean triton/other time {statistics.geometric_mean(ratios):.2f}x" if ratios else ""
        lines.append(f"   triton wins {wins} of {len(mine)}; summed ms: "
                     + ", ".join(f"{n} {t:.3f}" for n, t in total.items()) + f", winners {best:.3f}{mean}")
    return lines


def tune_table(record: dict) -> list[str]:
    blocks = record.get("blocks", [])
    lines = [f"   {record['model']} batch {record['batch']} {record['dtype']} on {record['device']}"
             + (f" (worker {record['worker']})" if record.get("worker") else "")
             + f": {record['total_s']:.1f} s over {len(blocks)} block runs"]
    compiles = record.get("triton_compiles")
    if compiles and "compiled" in compiles:
        mean = compiles["compile_s"] / compiles["compiled"] if compiles["compiled"] else 0.0
        lines.append(f"   Triton: {compiles['compiled']} compiles, {compiles['compile_s']:.1f} s "
                     f"({mean:.2f} s each), {compiles['cache_hits']} cache hits")
    if not record.get("worker"):
        lines += [f"   {b['block']:<36} {b['mode']:<10} first call {b['first_call_s']:.2f} s" for b in blocks]
    return lines


def triton_cache_line(path: Path) -> str:
    """A listing of `size path` lines: kernel count (one .json metadata file each) and MiB."""
    sizes, kernels = 0, 0
    for row in path.read_text().splitlines():
        size, _, name = row.partition(" ")
        if size.isdigit():
            sizes += int(size)
            kernels += name.endswith(".json") and not name.endswith(".autotune.json") \
                and "__grp__" not in name
    return f"   {path.stem}: {kernels} kernels, {sizes / 2**20:.1f} MiB"


def folder_sections(folder: Path) -> None:
    """What a gpu_check.sh folder holds beyond its JSON records."""
    if (folder / "stages.tsv").exists():
        print("== stages (benchmarks/gpu_check.sh)")
        print("\n".join(stage_table(folder / "stages.tsv")))
    if (folder / "smoke.txt").exists():
        print("== smoke (python -m fusedres.bench.smoke): every backend vs float64 eager")
        print("\n".join(smoke_table(folder / "smoke.txt")))
    if (folder / "stages.tsv").exists() or (folder / "fusedres-cache").exists():
        # FUSEDRES_CACHE_DIR of gpu_check's timed stages (tune, CLI, blocks)
        print("== never-slower tuner: measured ms per shape (fusedres-cache/dispatch)")
        print("\n".join(dispatch_table(folder / "fusedres-cache" / "dispatch")))
    listings = sorted(folder.glob("triton-cache-*.txt"))
    if listings:
        print("== Triton caches (TRITON_CACHE_DIR per stage)")
        print("\n".join(triton_cache_line(p) for p in listings))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m fusedres.bench.summary RESULTS_DIR_OR_JSON...")
    for a in args:
        if Path(a).is_dir():
            folder_sections(Path(a))
    for path in _files(args):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"== {path.name}: unreadable ({e})")
            continue
        if "runs" in record:
            env = record["environment"]
            machine = env.get("card") or env.get("cpu")
            if not env.get("card") and env.get("cpu_capability"):  # CPU numbers depend on the ISA and threads
                machine += f" ({env['cpu_threads']} threads, {env['cpu_capability']})"
            print(f"== {path.name}: {machine} | torch {env['torch']}")
            print("\n".join(cli_table(record)))
        elif "rows" in record and "copy_bandwidth_GBps" in record:
            print(f"== {path.name}: fusedres._C kernels vs PyTorch ops, {record['device']}, {record['dtype']}, "
                  f"batch {record['batch']}")
            from fusedres.bench.kernels import format_row

            print("\n".join("   " + format_row(row) for row in record["rows"]))
        elif "benchmarks" in record:
            print(f"== {path.name}: per-block suite ({len(record['benchmarks'])} cases)")
            print("\n".join(block_table(record)))
        elif "blocks" in record and "total_s" in record:
            print(f"== {path.name}: python -m fusedres.bench.tune")
            print("\n".join(tune_table(record)))


if __name__ == "__main__":
    main()
