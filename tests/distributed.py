"""A multi-process harness for torch.distributed tests: real processes, gloo, the CPU.

    from distributed import run_ranks

    def _body(rank, world_size, scale):      # module level, so that it pickles by name
        t = torch.full((1,), float(rank) * scale)
        dist.all_reduce(t)
        return t.item()                      # anything picklable comes back to the parent

    def test_sum():
        assert run_ranks(2, _body, 2.0) == [2.0, 2.0]

`run_ranks(world_size, body, *args)` starts `world_size` processes with the forkserver
start method (see `_context`); each sets `torch.set_num_threads(1)`, joins a process group (gloo by default, a TCP
store on a free 127.0.0.1 port, a bounded `timeout` so that mismatched collectives raise
instead of hanging), calls `body(rank, world_size, *args)`, sends its return value or its
traceback back through a multiprocessing queue, and destroys its process group. The parent
returns the rank-ordered results, or raises `RankFailure` with every failing rank's
traceback; ranks still running `grace` seconds after the first failure, and all ranks at
the overall `timeout`, are killed.

Children import the module that defines `body` by name, with the parent's `sys.path`
(multiprocessing passes it on), so bodies can live in a test module that tests/ is on the
path for (`from distributed import run_ranks`, as `from helpers import ...`). They get the
parent's environment as it is at `run_ranks` (TRITON_INTERPRET from conftest.py,
PYTHONPATH); `env=` sets or (with None) removes variables for the children only.

Starting ranks: with the spawn start method every rank pays an interpreter start and the
torch, torchvision and fusedres imports, ~4-5 s on the 2-core CI machine (measured). A
forkserver started once per test session with those modules preloaded forks each rank
from a process that has them already (and has run no threads, which fork would not copy).
Even so, run several checks inside one start: `run_checks(checks)` runs named checks one after
another, each on a process group of its own (a check that fails part-way cannot feed its
pending collectives to the next check), and returns {name: None or traceback};
`check_failures(results, name)` in the parent collects one check's failures over ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 180.0       # seconds for the whole run, process start included
DEFAULT_PG_TIMEOUT = 60.0     # seconds a collective (or the rendezvous) may wait
DEFAULT_GRACE = 10.0          # seconds the other ranks get to report after one fails


class RankFailure(AssertionError):
    """One or more ranks raised, died or timed out; the message holds their tracebacks."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the forkserver, before it forks any rank (a missing one is skipped).
PRELOAD = ["torch", "torch.distributed", "torchvision", "timm", "fusedres", "helpers", "distributed"]


def _context():
    """The forkserver context, its preload set (a no-op once its server runs)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _child(rank: int, world_size: int, port: int, backend: str, pg_timeout: float,
           environ: dict[str, str], body: Callable[..., Any], args: tuple, results: Any) -> None:
    # The forkserver's environment is the parent's when the server started: set today's.
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(1)
    import fusedres  # noqa: F401  (children must import it, even when `body`'s module does not)

    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout))
        value = body(rank, world_size, *args)
        # Plain pickle, not the queue's ForkingPickler: torch registers reductions there that
        # send tensors as shared-memory handles, which die with this process.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001  (a broken group must not hide the body's result)
                pass


def _environment(env: Mapping[str, str | None] | None) -> dict[str, str]:
    """The parent's environment with `env` applied (None: remove the variable)."""
    environ = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            environ.pop(k, None)
        else:
            environ[k] = v
    return environ


def run_ranks(world_size: int, body: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT,
              pg_timeout: float = DEFAULT_PG_TIMEOUT, grace: float = DEFAULT_GRACE, backend: str = "gloo",
              env: Mapping[str, str | None] | None = None) -> list[Any]:
    """Run `body(rank, world_size, *args)` in `world_size` new processes; return the
    results in rank order, or raise RankFailure with the failing ranks' tracebacks.

    `body` and `args` must be picklable (a module-level function). `pg_timeout` bounds the
    rendezvous and every collective of the default group; `timeout` the whole run; after a
    first failure the others get `grace` seconds to report before they are killed.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    environ = _environment(env)
    procs = []
    for rank in range(world_size):
        p = ctx.Process(target=_child, name=f"rank{rank}", daemon=True,
                        args=(rank, world_size, port, backend, pg_timeout, environ, body, args, results))
        p.start()
        procs.append(p)

    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(errors) < world_size:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, status, payload = results.get(timeout=min(0.2, deadline - now))
            except queue_module.Empty:
                # A rank that died without reporting (segfault, os._exit, killed for memory).
                # Read the exit code first: a rank that put its result and then exited may
                # still have it in the pipe, so look once more before calling it dead.
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode is not None and r not in values and r not in errors]
                if dead:
                    with contextlib.suppress(queue_module.Empty):
                        while True:
                            rank, status, payload = results.get(timeout=0.5)
                            if status == "ok":
                                values[rank] = pickle.loads(payload)
                            else:
                                errors[rank] = payload
                    for r in dead:
                        if r not in values and r not in errors:
                            errors[r] = f"rank {r} exited with code {procs[r].exitcode} without reporting"
                continue
            if status == "ok":
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
            if errors:
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        # Ranks that reported still destroy their process group; failed runs get less time.
        join_by = time.monotonic() + (1.0 if errors or len(values) < world_size else 15.0)
        for p in procs:
            p.join(timeout=max(0.0, join_by - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        results.close()
        results.join_thread()

    missing = [r for r in range(world_size) if r not in values and r not in errors]
    for r in missing:
        errors[r] = (f"rank {r} did not report within the time limit (timeout={timeout:g}s, "
                     f"grace after a failure={grace:g}s) and was killed")
    if errors:
        parts = [f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors)]
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(parts))
    return [values[r] for r in range(world_size)]


def run_checks(checks: Mapping[str, Callable[[dist.ProcessGroup], None]], *,
               pg_timeout: float = DEFAULT_PG_TIMEOUT) -> dict[str, str | None]:
    """Inside a rank: run each check(group) in order, each on a new process group of all
    ranks; return {name: None if it passed, else its traceback}. Every rank must pass the
    same checks in the same order (new_group is collective)."""
    outcome: dict[str, str | None] = {}
    for name, check in checks.items():
        group = dist.new_group(timeout=datetime.timedelta(seconds=pg_timeout))
        try:
            check(group)
            outcome[name] = None
        except Exception:  # noqa: BLE001  (reported to the parent, per check)
            outcome[name] = traceback.format_exc()
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)
    return outcome


def check_failures(per_rank: list[Mapping[str, str | None]], name: str) -> str | None:
    """In the parent: the tracebacks of check `name` on every rank where it failed, or None."""
    failed = [(rank, outcome[name]) for rank, outcome in enumerate(per_rank) if outcome[name] is not None]
    if not failed:
        return None
    return f"check {name!r} failed on {len(failed)} of {len(per_rank)} ranks:\n" + "\n".join(
        f"--- rank {rank} ---\n{tb}" for rank, tb in failed)
