"""The ahead-of-time compile check (fusedres.bench.compiled) and the shared-memory pruning it proves.

The subset runs in a subprocess without TRITON_INTERPRET (the conftest sets it on CPU, and
under it triton.jit gives interpreted functions that cannot be compiled)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedres.triton import common
from fusedres.triton import conv as tconv
from fusedres.triton import conv_backward as cb

ROOT = Path(__file__).resolve().parents[1]
H100, A100 = (232448, 9), (166912, 8)  # (opt-in shared memory per block, capability major)


def _cannot_compile() -> str | None:
    """Why Triton cannot compile for a GPUTarget here, or None."""
    try:
        from triton import knobs
        from triton.backends import backends
    except ImportError as e:
        return f"this Triton has no knobs/backends API: {e}"
    if "nvidia" not in backends:
        return "Triton has no NVIDIA backend"
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:  # knobs raise when the bundled binary is missing
        return f"no ptxas: {e}"
    if not ptxas or not os.access(ptxas, os.X_OK):
        return f"no executable ptxas ({ptxas!r})"
    return None


def test_compiled_subset():
    reason = _cannot_compile()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "fusedres.bench.compiled", "--subset", "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "kernel variants compiled" in out and "OK: no compile error" in out, out[-6000:]
    for arch in ("sm_90", "sm_80"):
        assert f"\n{arch} " in proc.stdout  # a table row of each arch


def _cfgs(configs) -> set[tuple[int, int, int, int, int]]:
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in configs}


def _conv_prune(monkeypatch, target, dtype, **flags):
    monkeypatch.setattr(common, "SMEM_TARGET", target)
    x = torch.empty(1, dtype=dtype)
    args = {"OCg": 512, "Cg": 512, "K_TOTAL": 4608, "x_ptr": x}
    return tconv._prune_configs(tconv._GPU_CONFIGS, args, FLAT_K=False, **flags)


def test_smem_estimate_covers_measured():
    # Shared memory of compiled variants (Triton 3.6 and 3.8, fusedres.bench.compiled), which
    # the estimate must not undercount: (bm, bn, bk, stages, elem, major, prologue/stats), bytes.
    measured = [
        ((128, 64, 64, 4, 4, 9, True), 206336),  # fp32 prologue+stats on sm_90: 201.5 KiB
        ((128, 64, 64, 4, 4, 8, True), 181760),  # the same on sm_80: 177.5 KiB
        ((128, 128, 64, 3, 2, 9, True), 115712),
        ((128, 256, 64, 3, 2, 9, True), 164864),
        ((128, 64, 64, 4, 2, 8, True), 91648),
        ((128, 256, 64, 3, 2, 9, False), 147456),
        ((128, 128, 64, 3, 2, 8, False), 65536),
        ((64, 128, 16, 4, 2, 9, False), 32768),  # the stem's fp16 wgrad: the epilogue's fp32 tile
        ((64, 128, 32, 3, 2, 8, False), 32768),
    ]
    for (bm, bn, bk, stages, elem, major, transform), shared in measured:
        assert common.smem_estimate(bm, bn, bk, stages, elem, major, transform) >= shared


@pytest.mark.parametrize("target", [H100, A100], ids=["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_prune_fits_the_target(monkeypatch, target, dtype):
    limit, major = target
    elem = torch.empty(0, dtype=dtype).element_size()
    for flags in ({}, {"HAS_PROLOGUE": True, "PROLOGUE_RELU": True, "STATS": True}):
        kept = _conv_prune(monkeypatch, target, dtype, **flags)
        assert kept
        for bm, bn, bk, _, stages in _cfgs(kept):
            assert common.smem_estimate(bm, bn, bk, stages, elem, major, bool(flags)) <= limit
    # The fp32 prologue+stats 128x64x64 4-stage tile needs 177.5 KiB on sm_80: over the A100's limit.
    assert common.smem_estimate(128, 64, 64, 4, 4, A100[1], True) > A100[0]
    assert common.smem_estimate(128, 64, 64, 4, 4, H100[1], True) <= H100[0]
    monkeypatch.setattr(common, "SMEM_TARGET", target)
    g = torch.empty(1, dtype=dtype)
    for c in cb._prune_dgrad_configs(cb._DGRAD_GPU_CONFIGS, {"M0": 10**5, "Cg": 512, "OCg": 512, "K_TOTAL": 4608,
                                                             "g_ptr": g}, FLAT_K=False):
        kw = c.kwargs
        assert common.smem_estimate(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, elem, major) <= limit


def test_prune_drops_spilling_configs(monkeypatch):
    eval_cfgs = _cfgs(_conv_prune(monkeypatch, H100, torch.float16, HAS_BIAS=True, RELU=True))
    res_cfgs = _cfgs(_conv_prune(monkeypatch, H100, torch.float16, HAS_BIAS=True, HAS_RES=True, RELU=True))
    # 128 fp32 accumulators a thread plus the residual tile spilled: kept without the residual only.
    for cfg in ((128, 256, 64, 8, 3), (128, 128, 32, 4, 4)):
        assert cfg in eval_cfgs and cfg not in res_cfgs
    # Flat mode (ResNeXt's 4-channel groups): at most 16 gathered A elements a thread.
    monkeypatch.setattr(common, "SMEM_TARGET", H100)
    flat = tconv._prune_configs(tconv._GPU_CONFIGS, {"OCg": 4, "Cg": 4, "K_TOTAL": 36,
                                                     "x_ptr": torch.empty(1, dtype=torch.bfloat16)}, FLAT_K=True)
    assert all(bm * bk <= 16 * 32 * w for bm, _, bk, w, _ in _cfgs(flat))
    flat_w = cb._prune_wgrad_configs(cb._WGRAD_GPU_CONFIGS, {"M": 10**6, "SPLIT": 64, "Cg": 4, "OCg": 4, "K_TOTAL": 36,
                                                            "g_ptr": torch.empty(1, dtype=torch.bfloat16)},
                                     FLAT_K=True)
    assert all(bk * bn <= 16 * 32 * w for _, bn, bk, w, _ in _cfgs(flat_w))


def test_smem_target_off_device(monkeypatch):
    monkeypatch.setattr(common, "SMEM_TARGET", None)
    assert common.smem_target(torch.empty(1)) == (common.SMEM_BUDGET, 9)
    monkeypatch.setattr(common, "SMEM_TARGET", A100)
    assert common.smem_target(torch.empty(1)) == A100
