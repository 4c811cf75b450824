"""What the benchmark writes: the terminal table, the JSON record and the PNG chart."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

import fusedres

SPEEDUP_COLUMNS = {  # baseline key -> column title
    "eager_nchw_fp32": "vs NCHW",
    "eager_cl": "vs eager",
    "compile": "vs comp",
    "compile_freezing": "vs frz",
    "compile_max_autotune": "vs m-a",
    "cudnn_fused": "vs cuDNN",
}


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


# The /proc/cpuinfo flags that change which CPU kernels run (oneDNN, inductor's C++ code).
CPU_FLAGS: tuple[str, ...] = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                              "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # one processor is enough: the flags are the same on every core
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_description() -> dict:
    """The CPU model, its ISA flags and the threads PyTorch uses, so that CPU numbers from
    different machines are never compared unawares."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or "unknown",
        "cpu_flags": {f: f in flags for f in CPU_FLAGS} if flags else None,  # None: no /proc/cpuinfo
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ATen kernels dispatched to
        "cpu_threads": torch.get_num_threads(),
        "cpu_logical_cores": os.cpu_count(),
    }


def environment(device: torch.device) -> dict:
    """Versions and hardware, so that a number can be traced to where it came from."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "fusedres": fusedres.__version__,
        "git_commit": _run(["git", "-C", str(Path(fusedres.__file__).parent), "rev-parse", "--short", "HEAD"]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        **cpu_description(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("FUSEDRES_", "TRITON_", "TORCH_"))},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "card": props.name,
            "card_memory_GiB": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        })
    return env


def device_label(env: dict) -> str:
    if env.get("card"):
        return env["card"]
    isa = f", {env['cpu_capability']}" if env.get("cpu_capability") else ""
    return f"{env['cpu']} ({env['cpu_threads']} threads{isa})"


def format_table(run: dict) -> str:
    """One workload's results as a fixed-width table."""
    rows = run["candidates"]
    timed = {r["key"] for r in rows if r["status"] == "ok"}
    speed_cols = [k for k in SPEEDUP_COLUMNS if k in timed]
    header = f"{'candidate':<46}{'ms/iter':>9}{'min-max':>16}{'img/s':>10}"
    header += "".join(f"{SPEEDUP_COLUMNS[k]:>9}" for k in speed_cols)
    header += f"{'TFLOP/s':>9}{'roof':>6}{'mem MiB':>9}  parity"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["status"] != "ok":
            reason = r["reason"] if len(r["reason"]) <= 110 else r["reason"][:107] + "..."  # full text in JSON
            lines.append(f"{r['label']:<46}  {r['status'].upper()}: {reason}")
            continue
        s = r["summary"]
        line = f"{r['label']:<46}{s['median_ms']:>9.2f}{s['min_ms']:>8.2f}-{s['max_ms']:<7.2f}{r['img_per_s']:>10.1f}"
        line += "".join(f"{r['speedup'][k]:>8.2f}x" for k in speed_cols)
        roof = r.get("roofline_fraction")
        mem = r["memory"].get("peak_step_MiB")
        line += f"{r['tflops']:>9.2f}{(f'{roof:.0%}' if roof is not None else '-'):>6}"
        line += f"{(f'{mem:.0f}' if mem is not None else '-'):>9}  {_parity_text(r['parity'])}"
        lines.append(line)
    # Compilation happens in the untimed first call: say what it cost.
    first = [f"{r['key']} {r['first_call_s']:.1f}" for r in rows
             if "first_call_s" in r and (r["key"].startswith("compile") or r["kind"] == "fusedres")]
    if first:
        lines.append("first call, s (compilation and tuning, not in the times above): " + ", ".join(first))
    return "\n".join(lines)


def _parity_text(parity: dict) -> str:
    return ", ".join(f"{k} {v:.1e}" for k, v in parity["errors"].items())


def write_json(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")


def write_chart(record: dict, path: Path) -> str | None:
    """A bar chart of img/s per candidate (error bars: min-max), one panel per workload.
    Returns why no chart was written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    runs = record["runs"]
    rows = max(len(r["candidates"]) for r in runs) * len(runs)
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 0.45 * rows), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        ok = [c for c in run["candidates"] if c["status"] == "ok"]
        labels = [c["label"] for c in ok]
        rates = [c["img_per_s"] for c in ok]
        batch = run["workload"]["batch"]
        lo = [r - batch * 1000 / c["summary"]["max_ms"] for r, c in zip(rates, ok)]
        hi = [batch * 1000 / c["summary"]["min_ms"] - r for r, c in zip(rates, ok)]
        colors = ["tab:orange" if c["kind"] == "fusedres" else "tab:gray" for c in ok]
        ax.barh(labels, rates, xerr=[lo, hi], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("images / s (higher is better)")
        ax.set_title(f"{run['workload']['description']} | {device_label(record['environment'])}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
