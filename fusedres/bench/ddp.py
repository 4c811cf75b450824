"""Distributed training-step benchmark: N ranks on one machine, DDP and synchronised BN.

    python -m fusedres.bench.ddp --world-size 2 --model resnet18 --batch 8 --image 64
    python -m fusedres.bench.ddp --world-size 8 --model resnet50 --batch 64 --dtype bf16 --json ddp.json

N processes (torch.multiprocessing, forkserver: each rank forks from a server that imported
torch and fusedres once, and has touched neither threads nor CUDA) join a process group on a free 127.0.0.1 port
with a bounded timeout: NCCL with one GPU per rank when torch.cuda.device_count() >= N,
else gloo on the CPU (each rank with cpu_count // N threads). Rows, each one training step
(forward, cross-entropy, backward, SGD step) on the rank's slice of one seeded global batch:

  (a) eager_ddp         torchvision, nn.BatchNorm2d, under DDP
  (b) fused_ddp         fusedres.convert(model), nn.BatchNorm2d, under DDP
  (c) fused_syncbn      nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.convert(model)):
                        statistics over all ranks (fusedres.sync_bn); under DDP on a GPU; on
                        the CPU (DDP refuses CPU modules with nn.SyncBatchNorm) without DDP,
                        the gradients averaged by one flattened all_reduce per step
  (d) eager_syncbn_ddp  torchvision with nn.SyncBatchNorm under DDP (GPU only: PyTorch's
                        nn.SyncBatchNorm refuses CPU tensors)

Parity gate, before timing: one step of (b) against (a), and of (c) and (d) against one
process running the whole global batch through torchvision (their statistics are global):
a row whose loss is off by more than 1e-3 relative (fp32; bf16 3e-2) is reported, not timed;
the error of the averaged gradient vector is reported too (not gated: see GATE_RTOL).
Rows are timed interleaved, K steps each after W warm-up steps; a step's time is the slowest
rank's. Collectives per step and the bytes each rank puts in (the all-reduced tensor, its
own share of an all-gather, the broadcast buffers) are counted: DDP's gradient buckets by a
communication hook (allreduce_hook, DDP's default behaviour), DDP's buffer broadcast by
wrapping torch.distributed._broadcast_coalesced (buckets as c10d forms them), and
fusedres.sync_bn's and nn.SyncBatchNorm's all_gather / all_reduce by wrapping the
torch.distributed functions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import pickle
import queue as queue_module
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

MODELS = ("resnet18", "resnet50")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GATE_RTOL = {"fp32": 1e-3, "bf16": 3e-2}  # relative error of the loss and of the gradient vector (2-norm)
# The gate is on the loss. The gradients' error is reported, not gated: fp32 CPU gradients of
# any two implementations can differ by ~1e-2 (resnet18, batch 8, 64x64, one thread: eager fp32
# itself is 7e-3 off float64; with batch 2 at 32x32 layer4's BNs see 2 values per channel and
# eager is 60% off).
ROWS = {
    "eager_ddp": "(a) eager torchvision, BN, DDP",
    "fused_ddp": "(b) fusedres, BN, DDP",
    "fused_syncbn": "(c) fusedres, SyncBN",
    "eager_syncbn_ddp": "(d) eager torchvision, SyncBN, DDP",
}
# The torch.distributed functions wrapped (and counted) while a row's step runs.
_WRAPPED = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce", "broadcast",
            "_broadcast_coalesced")


@dataclass(frozen=True)
class Config:
    world_size: int
    model: str = "resnet18"
    batch: int = 8  # per rank
    image: int = 64
    dtype: str = "fp32"
    steps: int = 10
    warmup: int = 3
    seed: int = 0
    backend: str = "auto"  # fusedres backend
    pg_timeout_s: float = 120.0


# ---------------------------------------------------------------------------------------------
# Counting collectives


@dataclass
class Counter:
    """Collectives and bytes (this rank's payload) by kind, while it is the active counter."""

    counts: dict[str, list[int]] = field(default_factory=dict)

    def add(self, kind: str, calls: int, nbytes: int) -> None:
        entry = self.counts.setdefault(kind, [0, 0])
        entry[0] += calls
        entry[1] += nbytes

    def per_step(self, steps: int) -> dict[str, dict[str, float]]:
        return {k: {"calls": c / steps, "bytes": b / steps} for k, (c, b) in sorted(self.counts.items())}


class _Patches:
    """Wraps torch.distributed's collectives once per process; they count into `active`."""

    active: Counter | None = None
    suspended = False
    real: dict[str, Callable] = {}

    @classmethod
    def install(cls) -> None:
        for name in _WRAPPED:
            if name in cls.real or not hasattr(dist, name):
                continue
            cls.real[name] = getattr(dist, name)
            setattr(dist, name, cls._wrapper(name, cls.real[name]))

    @classmethod
    def _wrapper(cls, name: str, real: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if cls.active is not None and not cls.suspended:
                calls, nbytes = _payload(name, args, kwargs)
                cls.active.add(name if name != "_broadcast_coalesced" else "buffer_broadcast", calls, nbytes)
            return real(*args, **kwargs)
        counted.__wrapped__ = real
        return counted

    @classmethod
    @contextlib.contextmanager
    def quiet(cls) -> Iterator[None]:
        """Collectives made here are counted by the caller, not by the wrappers."""
        saved, cls.suspended = cls.suspended, True
        try:
            yield
        finally:
            cls.suspended = saved


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _payload(name: str, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(collective calls, bytes this rank contributes) of one call to torch.distributed.`name`."""
    if name == "_broadcast_coalesced":  # (process_group, tensors, buffer_size, src)
        tensors, bucket = (args[1], args[2]) if len(args) >= 3 else (kwargs["tensors"], kwargs["buffer_size"])
        return _coalesced_buckets(tensors, bucket), sum(_nbytes(t) for t in tensors)
    if name in ("all_gather", "all_gather_into_tensor", "all_gather_single"):
        tensor = args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input_tensor"))
    else:  # all_reduce, broadcast
        tensor = args[0] if args else kwargs["tensor"]
    return 1, _nbytes(tensor)


def _coalesced_buckets(tensors: list[torch.Tensor], limit: int) -> int:
    """How many broadcasts c10d's broadcast_coalesced makes: buckets per (dtype, device),
    each closed once it holds `limit` bytes (compute_bucket_assignment_by_size)."""
    open_bytes: dict[tuple, int] = {}
    closed = 0
    for t in tensors:
        key = (t.dtype, t.device)
        open_bytes[key] = open_bytes.get(key, 0) + _nbytes(t)
        if open_bytes[key] >= limit:
            closed += 1
            del open_bytes[key]
    return closed + len(open_bytes)


def _counting_hook(state, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP communication hook (Counter, dist.GradBucket) -> Future: count the bucket, then
    DDP's default (allreduce_hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if _Patches.active is state:
        state.add("ddp_grad_bucket_allreduce", 1, _nbytes(bucket.buffer()))
    with _Patches.quiet():
        return default_hooks.allreduce_hook(None, bucket)


def _flat_grad_allreduce(model: nn.Module, counter: Counter) -> None:
    """Average the gradients over the ranks with one all_reduce of one flat buffer (as DDP)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    if _Patches.active is counter:
        counter.add("grad_flat_allreduce", 1, _nbytes(flat))
    with _Patches.quiet():
        dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


# ---------------------------------------------------------------------------------------------
# The rows


@dataclass
class _Row:
    key: str
    model: nn.Module
    opt: torch.optim.Optimizer
    counter: Counter
    manual_sync: bool = False  # average the gradients by hand (fused SyncBN on the CPU)
    times_ms: list[float] = field(default_factory=list)

    def params(self) -> nn.Module:
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model


def _wrap(model: nn.Module, device: torch.device, counter: Counter) -> nn.Module:
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ddp.register_comm_hook(counter, _counting_hook)
    return ddp


def _build_rows(base: nn.Module, cfg: Config, device: torch.device) -> list[_Row]:
    import fusedres

    gpu = device.type == "cuda"

    def prepared(m: nn.Module) -> nn.Module:
        return m.to(device, memory_format=torch.channels_last).train()

    made = {
        "eager_ddp": (prepared(copy.deepcopy(base)), True),
        "fused_ddp": (prepared(fusedres.convert(base, backend=cfg.backend)), True),
        "fused_syncbn": (prepared(nn.SyncBatchNorm.convert_sync_batchnorm(
            fusedres.convert(base, backend=cfg.backend))), gpu),
    }
    if gpu:
        made["eager_syncbn_ddp"] = (prepared(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))), True)
    rows = []
    for key, (model, under_ddp) in made.items():
        counter = Counter()
        model = _wrap(model, device, counter) if under_ddp else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        rows.append(_Row(key, model, opt, counter, manual_sync=not under_ddp))
    return rows


def _step(row: _Row, x: torch.Tensor, labels: torch.Tensor, dtype: str, update: bool = True) -> torch.Tensor:
    """Forward, cross-entropy, backward (and the gradient average), SGD step; returns the loss."""
    row.opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        loss = F.cross_entropy(row.model(x), labels)
    loss.backward()
    if row.manual_sync:
        _flat_grad_allreduce(row.model, row.counter)
    if update:
        row.opt.step()
    return loss.detach()


def _global_batch(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded global batch (world_size x batch images), the same on every rank."""
    from fusedres.bench.workload import NUM_CLASSES

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = cfg.world_size * cfg.batch
    x = torch.randn(n, 3, cfg.image, cfg.image, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return x.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)


# ---------------------------------------------------------------------------------------------
# Parity gate


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    norm = b.norm().item()
    return (a - b).norm().item() / norm if norm else (a - b).norm().item()


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).float() for p in model.parameters()])


def _reference(base: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: Config
               ) -> tuple[float, torch.Tensor, int]:
    """One process, the whole global batch, torchvision with nn.BatchNorm2d: loss, gradients,
    and the fewest values any BN normalises each channel over."""
    ref = copy.deepcopy(base).to(x.device, memory_format=torch.channels_last).train()
    counts: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: counts.append(inp[0].numel() // inp[0].shape[1]))
             for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.autocast(x.device.type, dtype=DTYPES[cfg.dtype], enabled=cfg.dtype != "fp32"):
        loss = F.cross_entropy(ref(x), labels)
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.item(), _grads(ref), min(counts)


def _gate(rows: list[_Row], base: nn.Module, data: tuple, mine: tuple, cfg: Config) -> dict[str, dict]:
    """One step (no SGD update) of every row against its reference: (b) against (a) on this
    rank's slice, the SyncBN rows against one process on the global batch. The worst error
    over the ranks decides, so every rank times the same rows."""
    world = cfg.world_size
    losses = {r.key: _step(r, *mine, cfg.dtype, update=False) for r in rows}
    grads = {r.key: _grads(r.params()) for r in rows}
    ref_loss, ref_grads, global_count = _reference(base, *data, cfg)
    errors = []
    for r in rows:
        if r.key == "eager_ddp":
            errors.append((0.0, 0.0))
        elif r.key == "fused_ddp":
            errors.append((_rel(losses[r.key], losses["eager_ddp"]), _rel(grads[r.key], grads["eager_ddp"])))
        else:  # global statistics: the mean of the ranks' losses is the global batch's loss
            mean_loss = losses[r.key].float().clone()
            dist.all_reduce(mean_loss)
            errors.append((abs(mean_loss.item() / world - ref_loss) / abs(ref_loss), _rel(grads[r.key], ref_grads)))
    worst = torch.tensor(errors, dtype=torch.float64, device=mine[0].device).nan_to_num(nan=float("inf"))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    against = {"fused_ddp": "(a) eager_ddp, the same rank's slice"}
    tol = GATE_RTOL[cfg.dtype]
    out = {}
    for r, (loss_err, grad_err) in zip(rows, worst.tolist()):
        out[r.key] = {"against": against.get(r.key, "one process, torchvision, the global batch"),
                      "loss_rel_error": loss_err, "grad_rel_error": grad_err, "tolerance": tol,
                      "min_bn_count_global": global_count, "passed": loss_err <= tol}
    out["eager_ddp"] = {"against": "its own (the yardstick of (b))", "passed": True}
    return out


# ---------------------------------------------------------------------------------------------
# One rank


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_rows(rows: list[_Row], mine: tuple, cfg: Config, device: torch.device) -> None:
    """W warm-up steps per row, then K rounds of one timed, counted step per row."""
    for row in rows:
        for _ in range(cfg.warmup):
            _step(row, *mine, cfg.dtype)
    _sync(device)
    dist.barrier()
    for _ in range(cfg.steps):
        for row in rows:
            _Patches.active = row.counter
            begin = time.perf_counter()
            _step(row, *mine, cfg.dtype)
            _sync(device)
            row.times_ms.append((time.perf_counter() - begin) * 1000)
            _Patches.active = None


def _setup(rank: int, cfg: Config, port: int, nccl: bool) -> torch.device:
    if nccl:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world_size))
        device = torch.device("cpu")
    dist.init_process_group("nccl" if nccl else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=cfg.world_size, timeout=datetime.timedelta(seconds=cfg.pg_timeout_s))
    return device


def _rank_body(rank: int, cfg: Config, device: torch.device) -> dict:
    from fusedres.bench import report
    from fusedres.bench.workload import build_model

    _Patches.install()
    base = build_model(cfg.model, cfg.seed)
    data = _global_batch(cfg, device)
    mine = tuple(t[rank * cfg.batch:(rank + 1) * cfg.batch] for t in data)
    rows = _build_rows(base, cfg, device)
    gate = _gate(rows, base, data, mine, cfg)
    timed = [r for r in rows if gate[r.key]["passed"]]
    _time_rows(timed, mine, cfg, device)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in base.modules())
    return {"rank": rank, "gate": gate, "batch_norms": n_bn,
            "times_ms": {r.key: r.times_ms for r in timed},
            "collectives": {r.key: r.counter.per_step(cfg.steps) for r in timed},
            "environment": report.environment(device) if rank == 0 else None}


def _rank_main(rank: int, cfg: Config, port: int, nccl: bool, results: Any) -> None:
    device = _setup(rank, cfg, port, nccl)
    try:
        results.put((rank, pickle.dumps(_rank_body(rank, cfg, device))))  # plain pickle: no shared tensors
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cfg: Config, nccl: bool, timeout_s: float) -> list[dict]:
    """Run every rank; their results in rank order (a rank's exception is raised here)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "fusedres"])  # no-op if the server runs already
    results = ctx.Queue()
    procs = mp.start_processes(_rank_main, args=(cfg, _free_port(), nccl, results), nprocs=cfg.world_size,
                               join=False, start_method="forkserver")
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < cfg.world_size:
            with contextlib.suppress(queue_module.Empty):
                rank, payload = results.get(timeout=0.5)
                got[rank] = pickle.loads(payload)
                continue
            if procs.join(timeout=0) and results.empty():  # raises when a rank failed
                raise RuntimeError(f"ranks exited without reporting: {sorted(set(range(cfg.world_size)) - set(got))}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ranks did not finish within {timeout_s:g} s")
        while not procs.join(timeout=30):
            pass
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(cfg.world_size)]


def _summary(per_rank: list[list[float]]) -> dict[str, float]:
    slowest = [max(step) for step in zip(*per_rank)]  # a step ends when its slowest rank does
    return {"median_ms": statistics.median(slowest), "min_ms": min(slowest), "max_ms": max(slowest)}


def _assemble(cfg: Config, ranks: list[dict], nccl: bool) -> dict:
    first = ranks[0]
    rows = []
    for key, label in ROWS.items():
        row: dict[str, Any] = {"key": key, "label": label}
        if key not in first["gate"]:
            row.update(status="skipped", reason="GPU only: PyTorch's nn.SyncBatchNorm refuses CPU tensors "
                                                "(and DDP CPU modules containing one)")
        elif key not in first["times_ms"]:
            row.update(status="failed", reason="parity gate", gate=first["gate"][key])
        else:
            coll = first["collectives"][key]
            row.update(status="ok", gate=first["gate"][key], summary=_summary([r["times_ms"][key] for r in ranks]),
                       times_ms_per_rank=[r["times_ms"][key] for r in ranks], collectives=coll,
                       collectives_per_step=sum(v["calls"] for v in coll.values()),
                       bytes_per_step=sum(v["bytes"] for v in coll.values()),
                       ranks_agree=all(r["collectives"][key] == coll for r in ranks))
        rows.append(row)
    env = first["environment"]
    return {"config": dataclasses.asdict(cfg) | {"process_group": "nccl" if nccl else "gloo"},
            "environment": env, "threads_per_rank": None if nccl else env["cpu_threads"],
            "batch_norms": first["batch_norms"], "rows": rows, "not_counted": _NOT_COUNTED}


_NOT_COUNTED = ("DDP's one-time collectives (parameter broadcast at construction, bucket rebuild after the first "
                "step) happen before the counted steps; the gate's and the timing's barriers are not counted; "
                "buffer broadcasts are counted as the buckets c10d would form, from the tensors handed to "
                "torch.distributed._broadcast_coalesced (C++: its own calls are not seen)")


def run(world_size: int, model: str = "resnet18", batch: int = 8, image: int = 64, dtype: str = "fp32",
        steps: int = 10, warmup: int = 3, seed: int = 0, backend: str = "auto",
        pg_timeout_s: float = 120.0, timeout_s: float = 1800.0) -> dict:
    """Run the benchmark on `world_size` ranks; returns the record (see the module doc)."""
    cfg = Config(world_size, model, batch, image, dtype, steps, warmup, seed, backend, pg_timeout_s)
    nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    return _assemble(cfg, _spawn(cfg, nccl, timeout_s), nccl)


# ---------------------------------------------------------------------------------------------
# Output


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _breakdown(coll: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{k} {v['calls']:g} x, {_fmt_bytes(v['bytes'])}" for k, v in coll.items())


def format_report(record: dict) -> str:
    cfg, env = record["config"], record["environment"]
    machine = env.get("card") or env["cpu"]
    threads = f"{record['threads_per_rank']} thread(s)/rank" if record["threads_per_rank"] else "1 GPU/rank"
    lines = [f"fusedres DDP training step: {cfg['model']}, batch {cfg['batch']}/rank, {cfg['image']}x{cfg['image']}, "
             f"{cfg['dtype']}, {cfg['steps']} steps after {cfg['warmup']} warm-up",
             f"machine: {machine} | torch {env['torch']} | world size {cfg['world_size']} ({cfg['process_group']}) "
             f"| {threads} | device {'cuda' if env.get('card') else 'cpu'}", ""]
    lines.append(f"{'row':<38} {'ms/step median [min-max]':<28} {'coll/step':>9} {'bytes/step':>12}  breakdown")
    for row in record["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['label']:<38} {row['status']}: {row['reason']}")
            continue
        s = row["summary"]
        t = f"{s['median_ms']:.1f} [{s['min_ms']:.1f}-{s['max_ms']:.1f}]"
        lines.append(f"{row['label']:<38} {t:<28} {row['collectives_per_step']:>9g} "
                     f"{_fmt_bytes(row['bytes_per_step']):>12}  {_breakdown(row['collectives'])}")
    lines.append("")
    for row in record["rows"]:
        g = row.get("gate")
        if g and "loss_rel_error" in g:
            lines.append(f"parity {row['key']}: loss {g['loss_rel_error']:.1e}, grads {g['grad_rel_error']:.1e} "
                         f"(loss tol {g['tolerance']:g}; grads not gated) vs {g['against']}: "
                         f"{'ok' if g['passed'] else 'FAILED'}")
    lines.append(f"{record['batch_norms']} BatchNorms; bytes = what each rank puts in (the all-reduced tensor, its "
                 "share of an all-gather); a step's time is the slowest rank's")
    lines.append(f"not counted: {record['not_counted']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusedres.bench.ddp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--model", default="resnet18", choices=MODELS)
    p.add_argument("--batch", type=int, default=8, help="images per rank (default 8)")
    p.add_argument("--image", type=int, default=64, help="image side (default 64)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16: autocast (AMP), fp32 weights")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (default 3)")
    p.add_argument("--backend", default="auto", help="fusedres backend of rows (b) and (c) (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run (default 1800)")
    p.add_argument("--json", type=Path, help="write the record here")
    args = p.parse_args(argv)
    if args.world_size < 2 or args.batch < 1 or args.image < 32 or args.steps < 1 or args.warmup < 0:
        p.error("--world-size >= 2, --batch >= 1, --image >= 32, --steps >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    record = run(args.world_size, args.model, args.batch, args.image, args.dtype, args.steps, args.warmup,
                 args.seed, args.backend, timeout_s=args.timeout)
    print(format_report(record), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=str))
        print(f"\nrecord: {args.json}")
    return record


if __name__ == "__main__":
    main()
