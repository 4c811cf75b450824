"""fusedres-bench: time fusedres against the strongest PyTorch baselines, in one process.

    fusedres-bench                      # GPU: resnet50, batch 256, bf16, inference + training
                                        # CPU: resnet50, batch 8, fp32, inference
    fusedres-bench --model resnet18 --batch 64 128 --dtype fp16 --mode training
    fusedres-bench --candidates eager_cl compile fusedres_triton --repeats 10
    fusedres-bench --model cifar_resnet56 --batch 128   # fusedres's CIFAR networks: 32x32, 10 classes
    fusedres-bench --model fpn_resnet50_body --mode inference training   # a detection backbone (FrozenBatchNorm2d)

Baselines: eager NCHW fp32, eager channels_last, torch.compile default; for inference with
inductor freezing (weights folded in as constants) "compile default+freezing" on the CPU and
"compile max-autotune+freezing" on a GPU; cuDNN's own fusion (GPU inference).

Every candidate is first checked against an fp32 reference (its logits, and when
training its parameter gradients); one that fails is reported as failed and not timed.
The rest are timed interleaved after warm-up; the table gives the median ms per
iteration, the spread, images/s, the speedup over every baseline that ran, TFLOP/s, the
fraction of the roofline (GPU), and the extra memory one step needs; the line below it
gives the first call of the compile and fusedres rows (compilation and tuning, kept out of
the timings). The JSON also records the machine: the card, or the CPU model, its ISA flags
and the thread count.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from fusedres.backends import UnsupportedInputError
from fusedres.bench import measure, report, roofline
from fusedres.bench.candidates import ALL_CANDIDATES, YARDSTICK, Candidate, Runner, build_candidates
from fusedres.bench.progress import Progress
from fusedres.bench.workload import (
    ALL_MODELS,
    DTYPES,
    MODES,
    Stage,
    Workload,
    block_stages,
    build_model,
    default_image_size,
    make_batch,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fusedres-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="resnet50", choices=ALL_MODELS,
                   help="a torchvision ResNet, fusedres's CIFAR networks (cifar_*: 10 classes, 32x32 by default), "
                        "or fpn_resnet50_body: the ResNet-50 body of torchvision's FPN detection models "
                        "(FrozenBatchNorm2d, layers 2-4 trainable; a training step's loss is its features' mean "
                        "square)")
    p.add_argument("--batch", type=int, nargs="+", help="batch size(s) (default: 256 on a GPU, 8 on a CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--mode", nargs="+", choices=MODES,
                   help="inference and/or training (forward + backward + SGD step) "
                        "(default: both on a GPU, inference on a CPU)")
    p.add_argument("--image-size", type=int, help="default: 224, and 32 for the cifar_* models")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--candidates", nargs="+", choices=ALL_CANDIDATES, default=list(ALL_CANDIDATES),
                   help=f"rows to run (default: all; {YARDSTICK} always runs: it sets the parity tolerance; "
                        "compile_freezing runs on the CPU for inference, compile_max_autotune on a GPU)")
    p.add_argument("--skip", nargs="+", choices=ALL_CANDIDATES, default=[], help="rows to leave out")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per candidate (median and spread)")
    p.add_argument("--warmup", type=int, help="untimed iterations per candidate (default: 3 GPU, 1 CPU)")
    p.add_argument("--iters", type=int, help="iterations per timed repeat (default: 10 GPU, 1 CPU)")
    p.add_argument("--out-dir", type=Path, default=Path("fusedres-bench-results"),
                   help="where the JSON and PNG go (default: ./fusedres-bench-results)")
    p.add_argument("--name", help="file stem for the JSON and PNG (default: model-device-date)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or (args.iters is not None and args.iters < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--repeats and --iters must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if any(b < 1 for b in args.batch or []):
        p.error("--batch sizes must be >= 1")
    return args


def _defaults(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.device = device
    args.batch = args.batch or [256 if gpu else 8]
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.mode = args.mode or (["inference", "training"] if gpu else ["inference"])
    args.warmup = 3 if args.warmup is None and gpu else (1 if args.warmup is None else args.warmup)
    args.iters = args.iters or (10 if gpu else 1)
    args.image_size = args.image_size or default_image_size(args.model)


_FUSEDRES_CHECKED: list[str] = []  # fusedres rows already run in this process (they share kernels and tuning)


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder.is_dir() else 0


def _cache_state() -> dict:
    """What a first call may find done already: compiled kernels (and, with
    TRITON_CACHE_AUTOTUNING=1, autotuning choices) in TRITON_CACHE_DIR, and tuning results
    of the never-slower tuner in FUSEDRES_CACHE_DIR. Counted before the first call, so that
    first_call_s can be read: all zero means it paid every compile, autotune and tune."""
    from fusedres.backends import tuning

    triton_dir = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return {"triton_cache_files": _count_files(triton_dir), "tuner_cache_files": _count_files(tuning.cache_dir()),
            "after_in_process": list(_FUSEDRES_CHECKED)}


def _inductor_cache_state() -> dict:
    """Files in inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR) before a compile row's first
    call: with a warm cache its first_call_s is mostly loading, not compiling."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return {"inductor_cache_files": _count_files(Path(cache_dir()))}


def _check(cand: Candidate) -> tuple[Runner | None, dict]:
    """Build and run a candidate once. Returns the runner and its result record so far.

    first_call_s is the first forward (+ backward) through the built candidate: for compile
    rows it is dynamo tracing and inductor compilation (freezing included; less where
    `first_call_caches` shows inductor's cache already filled); for fusedres
    rows it includes loading Triton, compiling and autotuning its kernels and the
    never-slower tuning, unless `first_call_caches` shows caches already filled (on disk, or
    in this process by the fusedres rows listed in after_in_process)."""
    row = {"key": cand.key, "label": cand.label, "kind": cand.kind}
    if cand.unavailable:
        return None, {**row, "status": "unavailable", "reason": cand.unavailable}
    try:
        runner = cand.build()
        if cand.kind == "fusedres":
            row["first_call_caches"] = _cache_state()
            _FUSEDRES_CHECKED.append(cand.key)
        elif cand.key.startswith("compile"):
            row["first_call_caches"] = _inductor_cache_state()
        begin = time.perf_counter()
        logits, grads = runner.check()
        measure.sync(runner.x.device)
        row["first_call_s"] = time.perf_counter() - begin
    except UnsupportedInputError as e:
        return None, {**row, "status": "unavailable", "reason": str(e)}
    except Exception as e:  # a broken candidate is reported, the others still run
        return None, {**row, "status": "error", "reason": f"{type(e).__name__}: {e}"}
    row["_outputs"] = (logits, grads)
    return runner, row


class _Costs(NamedTuple):
    """One workload's arithmetic: its FLOPs, and the roofline its rows are measured against."""

    stages: list[Stage]
    flops_per_image: float
    flops_per_iter: float
    element_bytes: int
    peak: float | None  # the card's peak FLOP/s in the workload's dtype (None: unknown)
    roof_ips: float | None  # roofline images/s (inference only)
    copy_bandwidth: float | None


def _workload_costs(model: torch.nn.Module, work: Workload, device_name: str,
                    copy_bandwidth: float | None) -> _Costs:
    stages = block_stages(model, work.image_size)
    flops_per_image = sum(s.flops for s in stages)
    flops_per_iter = flops_per_image * work.batch * (3 if work.mode == "training" else 1)
    element_bytes = torch.tensor([], dtype=work.torch_dtype).element_size()
    peak = roofline.peak_flops(device_name, work.dtype)
    roof_ips = roofline.roofline_images_per_second(stages, element_bytes, peak, copy_bandwidth) \
        if work.mode == "inference" else None
    return _Costs(stages, flops_per_image, flops_per_iter, element_bytes, peak, roof_ips, copy_bandwidth)


def _check_all(candidates: list[Candidate], progress: Progress) -> tuple[dict[str, Runner], list[dict]]:
    """`_check` every candidate: the runners of those that ran, and every candidate's row."""
    runners: dict[str, Runner] = {}
    rows: list[dict] = []
    for cand in candidates:
        runner, row = _check(cand)
        rows.append(row)
        if runner is not None:
            runners[cand.key] = runner
        progress.advance(f"check {cand.key}")
    return runners, rows


def _gate_parity(rows: list[dict], runners: dict[str, Runner], ref: measure.Reference, dtype: str) -> None:
    """Compare every checked row's outputs with the fp32 reference; the yardstick (eager
    channels_last in the same dtype) sets the tolerance. A row within it gets status "ok", one
    beyond it "failed" with the reason, and its runner leaves `runners` (it is not timed)."""
    yard = next(r for r in rows if r["key"] == YARDSTICK)
    yard_errors = measure.relative_errors(*yard["_outputs"], ref) if "_outputs" in yard else None
    for row in rows:
        if "_outputs" not in row:
            continue
        errors = measure.relative_errors(*row.pop("_outputs"), ref)
        tolerance = measure.parity_tolerance(dtype, errors, None if row["key"] == YARDSTICK else yard_errors)
        row["parity"] = {"errors": errors, "tolerance": tolerance}
        if measure.passes(errors, tolerance):
            row["status"] = "ok"
        else:
            row["status"] = "failed"
            row["reason"] = "parity: " + ", ".join(f"{k} error {errors[k]:.2e} > {tolerance[k]:.2e}" for k in errors)
            del runners[row["key"]]


def _measure_memory(rows: list[dict], runners: dict[str, Runner], device: torch.device, progress: Progress) -> None:
    for row in rows:
        if row["key"] in runners:
            row["memory"] = measure.peak_step_memory(runners[row["key"]], device)
        progress.advance(f"memory {row['key']}")


def _add_timings(rows: list[dict], times: dict[str, list[float]], batch: int, costs: _Costs) -> None:
    """Each timed row's times and what follows from them: summary, images/s, TFLOP/s, fractions."""
    for row in rows:
        if row["key"] not in times:
            continue
        row["times_ms"] = times[row["key"]]
        row["summary"] = s = measure.summarize(times[row["key"]])
        row["img_per_s"] = batch * 1000 / s["median_ms"]
        row["tflops"] = costs.flops_per_iter / (s["median_ms"] / 1000) / 1e12
        row["roofline_fraction"] = row["img_per_s"] / costs.roof_ips if costs.roof_ips else None
        row["compute_fraction"] = row["tflops"] * 1e12 / costs.peak if costs.peak else None


def _add_speedups(rows: list[dict]) -> None:
    """Each timed row's speedup over every timed baseline: the baseline's median / the row's."""
    base = {r["key"]: r["summary"]["median_ms"] for r in rows if "summary" in r and r["kind"] == "baseline"}
    for row in rows:
        if "summary" in row:
            row["speedup"] = {k: ms / row["summary"]["median_ms"] for k, ms in base.items()}


def _release(runners: dict[str, Runner], device: torch.device) -> None:
    """Drop the runners (models, optimizers, compiled code) before the next workload."""
    runners.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _workload_record(work: Workload, args: argparse.Namespace, costs: _Costs, rows: list[dict]) -> dict:
    return {
        "workload": {"model": work.model, "batch": work.batch, "dtype": work.dtype, "mode": work.mode,
                     "image_size": work.image_size, "device": str(work.device), "description": work.describe()},
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "iters_per_repeat": args.iters},
        "flops_per_image": costs.flops_per_image,
        "flops_per_iteration": costs.flops_per_iter,
        "roofline": {"images_per_s": costs.roof_ips, "peak_flops": costs.peak,
                     "copy_bandwidth_Bps": costs.copy_bandwidth,
                     "bytes_per_image_block_fused": sum(s.elements_moved for s in costs.stages) * costs.element_bytes},
        "candidates": rows,
    }


def run_workload(work: Workload, args: argparse.Namespace, copy_bandwidth: float | None,
                 device_name: str) -> dict:
    """Check every candidate against the fp32 reference, time those that pass (interleaved),
    measure their memory, and return the workload's record."""
    model = build_model(work.model, args.seed)
    x, labels = make_batch(work, args.seed + 1)
    costs = _workload_costs(model, work, device_name, copy_bandwidth)

    wanted = tuple(k for k in args.candidates if k not in args.skip)
    candidates = build_candidates(model, work, x, labels, wanted)
    progress = Progress(3 * len(candidates) + args.repeats * len(candidates) + 1, enabled=not args.no_progress)
    ref = measure.reference_outputs(model, work, x, labels)
    progress.advance("fp32 reference")

    runners, rows = _check_all(candidates, progress)
    _gate_parity(rows, runners, ref, work.dtype)
    # Rows that will not be timed have no warm-up or repeats: count them done, so the bar ends full.
    progress.advance("parity checked", units=(1 + args.repeats) * (len(candidates) - len(runners)))

    times = measure.time_interleaved(runners, args.repeats, args.warmup, args.iters, work.device,
                                     lambda label: progress.advance(label))
    _measure_memory(rows, runners, work.device, progress)
    progress.close()

    _add_timings(rows, times, work.batch, costs)
    _add_speedups(rows)
    _release(runners, work.device)
    return _workload_record(work, args, costs, rows)


def main(argv: list[str] | None = None) -> None:
    run(argv)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _import_cpp_extension_quietly() -> None:
    """Import torch.utils.cpp_extension (inductor's CPU compile does) with its one import-time
    warning dropped: on a machine without a GPU but with CUDA_HOME set it logs "No CUDA
    runtime is found", which is true and harmless here. Its other messages still show."""
    if torch.cuda.is_available() or "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    drop = _DropMessage("No CUDA runtime is found")
    logger.addFilter(drop)
    try:
        importlib.import_module("torch.utils.cpp_extension")  # a plain import would make `torch` local
    finally:
        logger.removeFilter(drop)


def run(argv: list[str] | None = None) -> dict:
    """Parse `argv`, run every workload, print the tables, write JSON and PNG; return the record."""
    args = parse_args(argv)
    _defaults(args)
    _import_cpp_extension_quietly()
    env = report.environment(args.device)
    device_name = env.get("card", "cpu")
    bandwidth = roofline.measure_copy_bandwidth(args.device)
    env["copy_bandwidth_GBps"] = bandwidth / 1e9 if bandwidth else None
    print(f"fusedres-bench | {report.device_label(env)} | torch {env['torch']} | triton {env['triton']}"
          + (f" | CUDA {env['cuda']} cuDNN {env['cudnn']}" if args.device.type == "cuda" else ""), flush=True)

    stem = args.name or f"{args.model}-{'cuda' if args.device.type == 'cuda' else 'cpu'}-" \
        f"{datetime.date.today().isoformat()}"
    json_path = args.out_dir / f"{stem}.json"
    record = {"environment": env, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "argv": sys.argv[1:] if argv is None else argv, "runs": []}
    for mode in args.mode:
        for batch in args.batch:
            work = Workload(args.model, batch, args.dtype, mode, args.image_size, args.device)
            print(f"\n== {work.describe()} ==", flush=True)
            record["runs"].append(run_workload(work, args, bandwidth, device_name))
            report.write_json(record, json_path)  # after every workload: an interrupted run keeps its results
            print(report.format_table(record["runs"][-1]), flush=True)

    print(f"\nraw numbers: {json_path}")
    if not args.no_chart:
        png_path = args.out_dir / f"{stem}.png"
        why_not = report.write_chart(record, png_path)
        print(f"chart: {png_path}" if why_not is None else f"no chart: {why_not}")
    print("\nvs X = X's time / this row's time (>1x: faster than X); mem = extra memory one step needs; "
          "parity = relative error against the fp32 reference")
    return record


if __name__ == "__main__":
    main()
