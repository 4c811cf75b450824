"""Ahead-of-time compile check of the Triton kernels, no GPU needed.

    python -m fusedres.bench.compiled [--subset] [--arch 90 80] [--family conv dgrad ...] [--json PATH]

Every Triton kernel variant the package launches for ResNet-50 (batch 256, 224x224) and
ResNeXt-50 32x4d's grouped 3x3 convs is compiled through Triton's real CUDA backend for
sm_90 (H100) and sm_80 (A100): the launchers themselves run on fake CUDA tensors with the
kernels swapped for recorders, so the argument lists, constexprs and integer
specialisations are exactly those of a real launch; each autotuned kernel gets every GPU
config its own prune function keeps, under the target card's shared-memory limit.

Per compiled variant: registers, spill bytes (the STL/LDL of the SASS), shared memory (the
kernel's metadata), the prune function's shared-memory estimate, the MMA instruction
(wgmma = `wgmma.mma_async` in the PTX and HGMMA in the SASS, else mma.sync / HMMA) and the
load pipelining (cp.async, TMA). The CUDA extension's kernels (`cuobjdump -res-usage` on
fusedres/_C*.so) are listed too.

Exit status 1 on: a compile error; shared memory over the card's limit; a measured shared
memory above the prune estimate; or a tap-mode ResNet-50 launch (fp16/bf16 forward, dgrad,
wgrad) with no spill-free wgmma config on sm_90. Everything else is reported, not failed.
Run it without TRITON_INTERPRET (under the interpreter triton.jit gives no compilable kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature

from fusedres.triton import bn as tbn
from fusedres.triton import common
from fusedres.triton import conv as tconv
from fusedres.triton import conv_backward as tcb
from fusedres.triton import prologue as tpro

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin; CUDA C Programming
# Guide, "Compute capabilities": 227 KiB on 9.0, 163 KiB on 8.0) and SM counts (H100 SXM, A100).
SMEM_LIMIT = {90: 232448, 80: 166912}
SM_COUNT = {90: 132, 80: 108}
ARCHS = (90, 80)
FAMILIES = ("conv", "dgrad", "wgrad", "bn", "prologue")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_KERNEL_MODULES = (common, tconv, tcb, tbn, tpro)


# ---------------------------------------------------------------------------------------
# The workload: the launches, recorded from the package's own launchers.


@dataclass(frozen=True)
class Conv:
    """One conv layer: NCHW input (batch, c, h, w), weight (oc, c/groups, k, k)."""

    name: str
    c: int
    oc: int
    k: int
    stride: int
    h: int
    groups: int = 1
    batch: int = 256

    @property
    def pad(self) -> int:
        return self.k // 2

    @property
    def out(self) -> int:
        return (self.h + 2 * self.pad - self.k) // self.stride + 1

    def describe(self) -> str:
        g = f" g{self.groups}" if self.groups > 1 else ""
        return f"{self.name} {self.k}x{self.k}/{self.stride} {self.c}->{self.oc}{g} @{self.h}"


def resnet50_convs() -> list[tuple[Conv, str]]:
    """(conv, role) of torchvision's ResNet-50 (stride in the 3x3); roles: stem, conv1, conv2,
    conv3 (the identity-residual last conv), conv3_proj (its projection shortcut fused in),
    downsample (the shortcut conv on its own, train mode). Repeated blocks' shapes once."""
    convs = [(Conv("stem", 3, 64, 7, 2, 224), "stem")]
    c_in, h = 64, 56
    for stage, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        h_out = h // stride
        pre = f"layer{stage}"
        convs += [
            (Conv(f"{pre}.0.conv1", c_in, planes, 1, 1, h), "conv1"),
            (Conv(f"{pre}.0.conv2", planes, planes, 3, stride, h), "conv2"),
            (Conv(f"{pre}.0.conv3", planes, 4 * planes, 1, 1, h_out), "conv3_proj"),
            (Conv(f"{pre}.0.downsample", c_in, 4 * planes, 1, stride, h), "downsample"),
            (Conv(f"{pre}.1.conv1", 4 * planes, planes, 1, 1, h_out), "conv1"),
            (Conv(f"{pre}.1.conv3", planes, 4 * planes, 1, 1, h_out), "conv3"),
        ]
        if stride != 1:
            convs.append((Conv(f"{pre}.1.conv2", planes, planes, 3, 1, h_out), "conv2"))
        c_in, h = 4 * planes, h_out
    return convs


def resnext50_grouped() -> list[Conv]:
    """ResNeXt-50 32x4d's grouped 3x3 convs: Cg = 4, 8 (flat mode), 16, 32 (tap mode)."""
    return [Conv(f"rx50.layer{i}.0.conv2", w, w, 3, s, h, groups=32)
            for i, (w, s, h) in enumerate(((128, 1, 56), (256, 2, 56), (512, 2, 28), (1024, 2, 14)), start=1)]


@dataclass
class Launch:
    """One kernel launch as a launcher makes it."""

    family: str
    kernel: JITFunction | Autotuner
    args: tuple
    kwargs: dict
    use: str
    dtype: str
    needs_wgmma: bool = False  # tap-mode ResNet-50 GEMM: must have a spill-free wgmma config on sm_90

    @property
    def jit(self) -> JITFunction:
        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, kernel: Any, sink: list) -> None:
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.sink.append((self.kernel, args, kwargs))


@contextlib.contextmanager
def _recording(sms: int) -> Iterator[list]:
    """Swap every kernel of the Triton modules for a recorder; fake CUDA tensors throughout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sink: list = []
    saved = []
    for mod in _KERNEL_MODULES:
        for name, value in list(vars(mod).items()):
            if isinstance(value, (JITFunction, Autotuner)):
                saved.append((mod, name, value))
                setattr(mod, name, _Recorder(value, sink))
    saved.append((tcb, "_sm_count", tcb._sm_count))
    tcb._sm_count = lambda index: sms  # wgrad's split-K as on the target card
    try:
        with FakeTensorMode(allow_non_fake_inputs=False):
            yield sink
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _nhwc(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)


def _vec(c: int) -> torch.Tensor:
    return torch.empty(c, device="cuda", dtype=torch.float32)


def _conv_launches(dtype: torch.dtype, dname: str, sink: list, subset: bool) -> list[tuple[int, str, str, bool]]:
    """Run the forward launcher for every (conv, epilogue) the package launches; returns
    (sink index, family, use, needs_wgmma) marks."""
    marks = []

    def run(conv: Conv, what: str, check: bool, **kw: Any) -> None:
        x = _nhwc(conv.batch, conv.c, conv.h, conv.h, dtype=dtype)
        w = _nhwc(conv.oc, conv.c // conv.groups, conv.k, conv.k, dtype=dtype)
        start = len(sink)
        launcher = tconv.conv_bn_stats if kw.pop("stats", False) else tconv.conv_bias_act
        launcher(x, w, stride=conv.stride, padding=conv.pad, groups=conv.groups, **kw)
        for i in range(start, len(sink)):
            marks.append((i, "conv", f"{conv.describe()} {what}", check and i == start))

    convs = resnet50_convs()
    grouped = resnext50_grouped()
    if subset:
        convs = [cv for cv in convs if cv[0].name in ("stem", "layer2.0.conv2", "layer3.1.conv3")]
        grouped = grouped[:1]
    tap = dname in ("fp16", "bf16")
    for conv, role in convs:
        check = tap and conv.k != 7
        out = _nhwc(conv.batch, conv.oc, conv.out, conv.out, dtype=dtype)
        bias = _vec(conv.oc)
        if role != "downsample":  # eval: BN folded into a bias; the downsample is fused into conv3_proj
            if role == "conv3":
                run(conv, "eval bias+res+relu", check, bias=bias, residual=out, relu=True)
            elif role == "conv3_proj":
                ds = next(c for c, r in resnet50_convs() if r == "downsample" and c.name[:6] == conv.name[:6])
                sx = _nhwc(ds.batch, ds.c, ds.h, ds.h, dtype=dtype)
                sw = _nhwc(ds.oc, ds.c, 1, 1, dtype=dtype)
                run(conv, "eval bias+proj+relu", check, bias=bias, shortcut_x=sx, shortcut_weight=sw,
                    shortcut_stride=ds.stride, relu=True)
            else:
                run(conv, "eval bias+relu", check, bias=bias, relu=True)
            if role == "conv2":  # a pre-activation block's first conv: its norm1 + ReLU in the prologue
                run(conv, "eval prologue+bias+relu", check, bias=bias, relu=True, in_scale=_vec(conv.c),
                    in_shift=_vec(conv.c), prologue_relu=True)
                # ... and, standing in for a CIFAR block's last conv, the option-A shortcut read in place
                sx = _nhwc(conv.batch, conv.oc // 2, conv.out, conv.out, dtype=dtype)
                run(conv, "eval bias+zero-pad shortcut+relu", check, bias=bias, shortcut_x=sx, relu=True)
        # train (the genstats chain): a block's first conv, the downsample and the stem take
        # their input as it is; the others apply the previous BN + ReLU in their prologue.
        if role in ("stem", "conv1", "downsample"):
            run(conv, "train stats", check, stats=True)
        else:
            run(conv, "train prologue+relu+stats", check, in_scale=_vec(conv.c), in_shift=_vec(conv.c),
                prologue_relu=True, stats=True)
        if role == "conv3":  # a pre-activation block's last conv: shortcut added, the sum's statistics
            run(conv, "train prologue+relu+res+stats", check, in_scale=_vec(conv.c), in_shift=_vec(conv.c),
                prologue_relu=True, residual=out, stats=True)
    for conv in grouped:
        run(conv, "eval bias+relu", False, bias=_vec(conv.oc), relu=True)
        run(conv, "train prologue+relu+stats", False, in_scale=_vec(conv.c), in_shift=_vec(conv.c),
            prologue_relu=True, stats=True)
    return marks


def _backward_launches(dtype: torch.dtype, dname: str, sink: list, families: set[str],
                       subset: bool) -> list[tuple[int, str, str, bool]]:
    marks = []
    convs = [cv for cv, _ in resnet50_convs()]
    grouped = resnext50_grouped()
    if subset:
        convs = [cv for cv in convs if cv.name in ("layer1.0.conv2", "layer3.0.downsample")]
        grouped = grouped[:1]
    tap = dname in ("fp16", "bf16")
    for conv in convs + grouped:
        check = tap and conv.k != 7 and conv.groups == 1
        x = _nhwc(conv.batch, conv.c, conv.h, conv.h, dtype=dtype)
        w = _nhwc(conv.oc, conv.c // conv.groups, conv.k, conv.k, dtype=dtype)
        g = _nhwc(conv.batch, conv.oc, conv.out, conv.out, dtype=dtype)
        geo = dict(stride=conv.stride, padding=conv.pad, groups=conv.groups)
        if "dgrad" in families and conv.name != "stem":  # the stem's input needs no gradient
            start = len(sink)
            tcb.conv_dgrad(g, w, tuple(x.shape), **geo)
            marks += [(i, "dgrad", f"{conv.describe()} dgrad", check and i == start) for i in range(start, len(sink))]
        if "wgrad" in families:
            start = len(sink)
            tcb.conv_wgrad(g, x, tuple(w.shape), out_dtype=dtype, **geo)
            marks += [(i, "wgrad", f"{conv.describe()} wgrad", check and i == start) for i in range(start, len(sink))]
    return marks


def _bn_launches(dtype: torch.dtype, sink: list, subset: bool) -> list[tuple[int, str, str, bool]]:
    """The train-mode BN passes, at the channel counts that give distinct tile shapes."""
    marks = []
    for c, h in ((64, 56),) if subset else ((64, 112), (256, 56), (2048, 7)):
        start = len(sink)
        y = _nhwc(256, c, h, h, dtype=dtype)
        scale, vec_ = _vec(c), _vec(c)
        tbn.bn_stats(y)
        tbn.scale_bias_act(y, scale, vec_, residual=y, residual_scale=scale, residual_bias=vec_, relu=True)
        tbn.scale_bias_act_backward(y, y, y, scale, y, scale, [True] * 6)
        # The option-A shortcut: a stride-2 view of the block input with half the channels.
        narrow = _nhwc(256, c // 2, 2 * h, 2 * h, dtype=dtype)[:, :, ::2, ::2]
        tbn.scale_bias_act(y, scale, vec_, residual=narrow, relu=True)
        tbn.scale_bias_act_backward(y, y, y, scale, narrow, None, [True, True, True, True, False, False])
        if not subset:
            tbn.scale_bias_act(y, scale, vec_, relu=True)
            tbn.scale_bias_act(y, scale, vec_, residual=y, relu=True)
            tbn.scale_bias_act_backward(y, y, y, scale, y, None, [True, True, True, True, False, False])
            tpro.conv_bn_stats_grad_y(None, y, scale, vec_, vec_)  # bn_stats' backward
        marks += [(i, "bn", f"bn C={c} @{h}", False) for i in range(start, len(sink))]
    return marks


def _prologue_launches(dtype: torch.dtype, sink: list, subset: bool) -> list[tuple[int, str, str, bool]]:
    marks = []
    for c, h in ((64, 56),) if subset else ((64, 56), (512, 28)):
        start = len(sink)
        x = _nhwc(256, c, h, h, dtype=dtype)
        scale, vec_ = _vec(c), _vec(c)
        tpro.prologue(x, scale, vec_, True)
        if not subset:
            tpro.conv_bn_stats_grad_y(x, x, scale, vec_, vec_)
            tpro.prologue_backward(x, x, scale, vec_, True, [True, True, True])
        marks += [(i, "prologue", f"prologue C={c} @{h}", False) for i in range(start, len(sink))]
    return marks


def collect_launches(arch: int, families: set[str], dtypes: list[str], subset: bool) -> list[Launch]:
    launches = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        with _recording(SM_COUNT[arch]) as sink:
            marks = []
            if "conv" in families:
                marks += _conv_launches(dtype, dname, sink, subset)
            if families & {"dgrad", "wgrad"}:
                marks += _backward_launches(dtype, dname, sink, families, subset)
            if "bn" in families:
                marks += _bn_launches(dtype, sink, subset)
            if "prologue" in families:
                marks += _prologue_launches(dtype, sink, subset)
        for i, family, use, check in marks:
            kernel, args, kwargs = sink[i]
            launches.append(Launch(family, kernel, args, dict(kwargs), use, dname, check))
    return launches


# ---------------------------------------------------------------------------------------
# Compiling


_GPU_CONFIGS = {"_conv_kernel": tconv._GPU_CONFIGS, "_dgrad_kernel": tcb._DGRAD_GPU_CONFIGS,
                "_wgrad_kernel": tcb._WGRAD_GPU_CONFIGS}


def _configs(launch: Launch, arch: int, subset: bool) -> list[triton.Config | None]:
    """The configs the autotuner would see on the target card (the subset: the first)."""
    if not isinstance(launch.kernel, Autotuner):
        return [None]
    named = dict(zip(launch.kernel.arg_names, launch.args))
    saved = common.SMEM_TARGET
    common.SMEM_TARGET = (SMEM_LIMIT[arch], arch // 10)
    try:
        configs = launch.kernel.early_config_prune(_GPU_CONFIGS[launch.jit.__name__], named, **launch.kwargs)
    finally:
        common.SMEM_TARGET = saved
    return configs[:1] if subset else configs


def _estimate(launch: Launch, cfg: triton.Config | None, arch: int) -> int | None:
    """The prune function's estimate (conv: with the prologue / statistics scratch)."""
    if cfg is None:
        return None
    kw = cfg.kwargs
    elem = launch.args[0].element_size()  # x_ptr / g_ptr
    transform = bool(launch.kwargs.get("HAS_PROLOGUE") or launch.kwargs.get("STATS"))
    return common.smem_estimate(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_stages, elem, arch // 10,
                                transform)


def _mock(v: Any) -> Any:
    return MockTensor(v.dtype) if isinstance(v, torch.Tensor) else v  # data_ptr 0: 16-byte aligned, as torch's


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def _sass_stats(cubin: bytes) -> dict[str, Any]:
    """Registers (cuobjdump -res-usage), spill bytes and MMA instructions (the SASS)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", res.stdout)
    stack = re.search(r"STACK:(\d+)", res.stdout)

    def spill_bytes(op: str) -> int:  # STL / LDL [.64 / .128]: bytes per thread, as ptxas -v counts them
        widths = re.findall(rf"\b{op}(?:\.(?:U|S)?(8|16|32|64|128))?\b", sass)
        return sum(int(w) // 8 if w else 4 for w in widths)

    return {"regs": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None,
            "spill_stores": spill_bytes("STL"), "spill_loads": spill_bytes("LDL"),
            "hgmma": len(re.findall(r"\bHGMMA\b", sass)), "hmma": len(re.findall(r"\bHMMA\b", sass))}


@dataclass
class Variant:
    """One compiled kernel: a kernel, its specialisation, constexprs and config, on one arch."""

    arch: int
    family: str
    kernel: str
    dtype: str
    tag: str
    config: str
    uses: list[str] = field(default_factory=list)
    needs_wgmma_uses: list[str] = field(default_factory=list)
    estimate: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def spills(self) -> int:
        return self.stats.get("spill_stores", 0) + self.stats.get("spill_loads", 0)

    @property
    def mma(self) -> str:
        s = self.stats
        if s.get("wgmma_ptx") and s.get("hgmma"):
            return "wgmma"
        if s.get("mma_ptx") or s.get("hmma"):
            return "mma.sync"
        return "-"

    @property
    def pipe(self) -> str:
        s = self.stats
        return "+".join(n for n, k in (("cp.async", "cp_async"), ("TMA", "tma")) if s.get(k)) or "-"

    def row(self) -> dict[str, Any]:
        return {"arch": f"sm_{self.arch}", "family": self.family, "kernel": self.kernel, "dtype": self.dtype,
                "variant": self.tag, "config": self.config, "mma": self.mma, "pipeline": self.pipe,
                "spill_bytes": self.spills, "smem_estimate": self.estimate, "smem_limit": SMEM_LIMIT[self.arch],
                "uses": self.uses, "error": self.error, **self.stats}


def _tag(constexprs: dict) -> str:
    """The launch's constexprs, short: flags that are set, values of the others (no tile sizes)."""
    parts = []
    for k, v in constexprs.items():
        if not k.isupper() or k in _BLOCKS or k in ("UPCAST", "STATS_TILE_M") or v is False or v is None:
            continue
        k = k.removeprefix("HAS_")
        parts.append(k if v is True else f"{v}" if k == "INPUT_PRECISION" else f"{k}={v}")
    return " ".join(parts)


def compile_all(launches: list[Launch], arch: int, log: Callable[[str], None], subset: bool = False,
                dry_run: bool = False) -> list[Variant]:
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binders: dict[int, Callable] = {}
    variants: dict[tuple, Variant] = {}
    todo = []
    for launch in launches:
        jit = launch.jit
        if id(jit) not in binders:
            binders[id(jit)] = create_function_from_signature(jit.signature, jit.params, backend)
        for cfg in _configs(launch, arch, subset):
            kwargs = {**launch.kwargs, **(cfg.all_kwargs() if cfg else {})}
            bound, spec, opts = binders[id(jit)](*map(_mock, launch.args), **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, opts)
            names = list(signature)
            named_consts = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
            key = (jit.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
                   options.num_warps, options.num_stages)
            if key not in variants:
                blocks = "x".join(str(named_consts[b]) for b in _BLOCKS if b in named_consts)
                conf = f"{blocks} w{options.num_warps} s{options.num_stages}".strip()
                variants[key] = Variant(arch, launch.family, jit.__name__, launch.dtype, _tag(named_consts), conf,
                                        estimate=_estimate(launch, cfg, arch))
                todo.append((variants[key], jit, signature, constexprs, attrs, options))
            variants[key].uses.append(launch.use)
            if launch.needs_wgmma:
                variants[key].needs_wgmma_uses.append(launch.use)
    if dry_run:
        return list(variants.values())
    for i, (var, jit, signature, constexprs, attrs, options) in enumerate(todo):
        t0 = time.perf_counter()
        try:
            ck = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
            ptx = ck.asm["ptx"]
            var.stats = {"shared": int(ck.metadata.shared), **_sass_stats(ck.asm["cubin"]),
                         "wgmma_ptx": "wgmma.mma_async" in ptx, "mma_ptx": "mma.sync" in ptx,
                         "cp_async": bool(re.search(r"cp\.async\.(ca|cg)", ptx)),
                         "tma": "cp.async.bulk.tensor" in ptx}
        except Exception as e:  # a compile error fails the check; keep going to list them all
            var.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        var.stats["compile_s"] = round(time.perf_counter() - t0, 2)
        log(f"[sm_{arch} {i + 1}/{len(todo)}] {var.kernel} {var.dtype} {var.tag} {var.config}: "
            f"{var.error or 'ok'} ({var.stats['compile_s']} s)")
    return list(variants.values())


# ---------------------------------------------------------------------------------------
# Checks and report


def failures(variants: list[Variant]) -> list[str]:
    out = []
    for v in variants:
        name = f"sm_{v.arch} {v.kernel} {v.dtype} {v.tag} {v.config}"
        if v.error:
            out.append(f"compile error: {name}: {v.error}")
            continue
        shared, limit = v.stats["shared"], SMEM_LIMIT[v.arch]
        if shared > limit:
            out.append(f"shared memory over the card's limit: {name}: {shared} > {limit} bytes")
        if v.estimate is not None and shared > v.estimate:
            out.append(f"prune estimate below the measured shared memory: {name}: {v.estimate} < {shared} bytes")
    needs: dict[tuple[int, str], list[Variant]] = {}
    for v in variants:
        for use in v.needs_wgmma_uses:
            needs.setdefault((v.arch, f"{v.dtype} {use}"), []).append(v)
    for (arch, use), vs in sorted(needs.items()):
        if arch == 90 and not any(not v.error and v.mma == "wgmma" and v.spills == 0 for v in vs):
            out.append(f"no spill-free wgmma config on sm_90: {use} (configs: "
                       f"{', '.join(f'{v.config} {v.mma} spills {v.spills}' for v in vs)})")
    return out


def table(variants: list[Variant]) -> str:
    head = ("arch", "kernel", "dtype", "variant", "config", "regs", "spill st/ld", "smem KiB", "est KiB", "mma",
            "pipeline", "uses")
    rows = [head]
    for v in variants:
        s = v.stats
        if v.error:
            rows.append((f"sm_{v.arch}", v.kernel, v.dtype, v.tag, v.config, "ERROR", v.error[:60], "", "", "", "",
                         str(len(v.uses))))
            continue
        est = f"{v.estimate / 1024:.1f}" if v.estimate is not None else ""
        rows.append((f"sm_{v.arch}", v.kernel, v.dtype, v.tag, v.config, str(s["regs"]),
                     f"{s['spill_stores']}/{s['spill_loads']}", f"{s['shared'] / 1024:.1f}", est, v.mma, v.pipe,
                     f"{len(v.uses)}: {v.uses[0]}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def summary(variants: list[Variant]) -> dict[str, Any]:
    ok = [v for v in variants if not v.error]
    out: dict[str, Any] = {"variants": len(variants), "errors": len(variants) - len(ok)}
    for arch in sorted({v.arch for v in variants}, reverse=True):
        vs = [v for v in ok if v.arch == arch]
        if not vs:
            continue
        top = max(vs, key=lambda v: v.stats["shared"])
        ratios = [(v.stats["shared"] / v.estimate, v) for v in vs if v.estimate]
        gemm = [v for v in vs if v.kernel in _GPU_CONFIGS]
        out[f"sm_{arch}"] = {
            "variants": len(vs),
            "max_shared": f"{top.stats['shared']} bytes of {SMEM_LIMIT[arch]} ({top.kernel} {top.dtype} {top.config})",
            "max_measured_over_estimate": (f"{max(ratios, key=lambda r: r[0])[0]:.3f} "
                                           f"({max(ratios, key=lambda r: r[0])[1].kernel} "
                                           f"{max(ratios, key=lambda r: r[0])[1].config})" if ratios else None),
            "spilling": sorted(f"{v.kernel} {v.dtype} {v.tag} {v.config}: {v.spills} B, {v.stats['regs']} regs"
                               for v in vs if v.spills),
            "gemm_without_wgmma": (sorted(f"{v.kernel} {v.dtype} {v.tag} {v.config}: {v.mma}"
                                          for v in gemm if v.mma != "wgmma") if arch >= 90 else "n/a on sm_80"),
            "gemm_without_cp_async": sorted(f"{v.kernel} {v.dtype} {v.tag} {v.config}"
                                            for v in gemm if "cp.async" not in v.pipe and "TMA" not in v.pipe),
        }
    return out


def extension_usage(path: Path | None = None) -> str:
    """`cuobjdump -res-usage` of the built CUDA extension (fusedres/_C*.so or `path`), one line per kernel and arch."""
    import fusedres

    libs = [path] if path else sorted(Path(fusedres.__file__).parent.glob("_C*.so"))
    if not libs:
        return "CUDA extension: extension not built (no fusedres/_C*.so)"
    lines = [f"CUDA extension: {libs[0]}"]
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(libs[0])], capture_output=True, text=True)
    if res.returncode:
        return f"CUDA extension: cuobjdump failed on {libs[0]}: {res.stderr.strip()}"
    arch = ""
    func = ""
    for line in res.stdout.splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            func = m.group(1)
        elif "REG:" in line and func:
            name = subprocess.run(["c++filt", func], capture_output=True, text=True).stdout.strip() or func
            lines.append(f"  {arch} {' '.join(line.split()[:5])}  {name[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedres.bench.compiled", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true", help="a few variants per kernel family (a quick check)")
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--json", type=Path, help="write every variant's numbers here")
    parser.add_argument("--extension", type=Path, help="the built extension to list (default: fusedres/_C*.so)")
    parser.add_argument("--dry-run", action="store_true", help="count the variants, compile nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-compile progress on stderr")
    args = parser.parse_args(argv)
    if common.INTERPRET:
        print("TRITON_INTERPRET=1 is set: the kernels are interpreted functions; run without it", file=sys.stderr)
        return 2
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    dtypes = args.dtype if not args.subset else [d for d in ("fp16", "bf16") if d in args.dtype] or args.dtype
    variants: list[Variant] = []
    for arch in args.arch:
        launches = collect_launches(arch, set(args.family), dtypes, args.subset)
        if args.subset:  # one dtype per family is enough for a quick check, bf16 for the grouped conv
            launches = [ln for ln in launches if ln.dtype == ("bf16" if " g32 " in ln.use else "fp16")]
        variants += compile_all(launches, arch, log, args.subset, args.dry_run)
    if args.dry_run:
        for arch in args.arch:
            counts: dict[str, int] = {}
            for v in variants:
                if v.arch == arch:
                    counts[v.kernel] = counts.get(v.kernel, 0) + 1
            print(f"sm_{arch}: {sum(counts.values())} variants: {counts}")
        return 0
    wall = time.perf_counter() - t0
    print(f"Triton {triton.__version__}, torch {torch.__version__}: {len(variants)} kernel variants compiled "
          f"in {wall:.0f} s (sm_90 limit {SMEM_LIMIT[90]} B, sm_80 {SMEM_LIMIT[80]} B)\n")
    print(table(variants))
    print()
    summ = summary(variants)
    print(json.dumps(summ, indent=2))
    print()
    ext = extension_usage(args.extension)
    print(ext)
    fails = failures(variants)
    print()
    print("\n".join(f"FAIL {f}" for f in fails) if fails else "OK: no compile error, every variant fits its card's "
          "shared memory and the prune estimate, every tap-mode ResNet-50 launch has a spill-free wgmma config")
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__, "wall_s": wall,
                                         "summary": summ, "failures": fails, "extension": ext,
                                         "variants": [v.row() for v in variants]}, indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
