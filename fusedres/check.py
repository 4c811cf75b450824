"""fusedres-check: the parity check of fusedres.testing as a command line, for CI.

    fusedres-check --model resnet50 --checkpoint weights.pt            # torchvision, fp32
    fusedres-check --timm resnet50d --dtype bfloat16 --json parity.json
    fusedres-check --factory mypkg.models:build_model --checkpoint ckpt.pt --input-size 160
    python -m fusedres.check --model resnet18 --input-size 64 --batch 2

Exit status: 0 when every compared tensor is within its bound, 1 on a parity failure (or
nothing fused, unless --allow-unfused), 2 on a usage error (bad model name, unreadable or
mismatched checkpoint, a dtype or device this machine cannot run), with one line
"fusedres-check: error: ..." on stderr and no traceback.

Without --checkpoint the model's BatchNorm statistics and affine parameters are randomised
(seeded) on the private copy, since freshly initialised BN makes eval-mode parity trivial;
the report says so.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import json
import os
import pickle
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusedres.testing import ParityReport, ParityUsageError, check_parity, randomize_batchnorm
from fusedres.testing.parity import DTYPES, MODES, first_conv

PROG = "fusedres-check"
DEFAULT_INPUT_SIZE = 224
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")  # where trainers nest the weights


class UsageError(Exception):
    """A one-line error for the user; exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status (0 pass, 1 parity failure, 2 usage error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own usage errors (status 2) and --help (0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    start = time.perf_counter()
    try:
        report = run(args)
    except (UsageError, ParityUsageError) as e:
        print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    print(report.format(verbose=args.verbose))
    print(f"checked in {time.perf_counter() - start:.1f} s")
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        except OSError as e:
            print(f"{PROG}: error: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0 if report.ok else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Check that fusedres.convert(model) computes what the model "
                                "computes (eval outputs; train outputs, gradients and BN statistics), in float64 "
                                "and in --dtype. Exit 0: pass, 1: parity failure, 2: usage error.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="a torchvision classification model name (torchvision.models.list_models())")
    source.add_argument("--timm", metavar="NAME", help="a timm model name (timm.create_model(NAME))")
    source.add_argument("--factory", metavar="MODULE:FUNCTION",
                        help="your own constructor, called with no arguments (MODULE may be a dotted name importable "
                             "from the current directory, or a path to a .py file)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a state_dict (also nested under 'state_dict' / 'model_state_dict' / 'model'), loaded with "
                        "torch.load(weights_only=True); a pickled nn.Module needs --trust-checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that is a pickled model (torch.load(weights_only=False) runs code from "
                        "the file: only for files you trust)")
    p.add_argument("--input-size", metavar="S|HxW",
                   help=f"input height and width (default: timm's pretrained_cfg, else {DEFAULT_INPUT_SIZE})")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="the dtype you ship, checked against float64 besides the float64 check itself "
                        "(default float32; float64: the float64 check only)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="the fused blocks' backend (default auto)")
    p.add_argument("--modes", default="eval,train", help="comma-separated: eval, train (default both)")
    p.add_argument("--steps", type=int, default=1, help="SGD steps in train mode (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs, the BN randomisation and the loss")
    p.add_argument("--allow-unfused", action="store_true", help="pass even when no block could be fused")
    p.add_argument("--json", metavar="PATH", help="also write the whole report as JSON")
    p.add_argument("--verbose", action="store_true", help="list every block and every compared tensor")
    return p


def run(args: argparse.Namespace) -> ParityReport:
    """Build the model and inputs the arguments describe and check them (UsageError on bad ones)."""
    modes = _modes(args.modes)
    if args.batch < 1 or args.steps < 1:
        raise UsageError("--batch and --steps must be at least 1")
    device = _device(args.device)
    torch.manual_seed(args.seed)  # the constructor's random init: the same model every run
    model, name = build_model(args)
    checkpoint = load_checkpoint(args.checkpoint, args.trust_checkpoint) if args.checkpoint else None
    model, name = _apply_checkpoint(model, name, checkpoint, args.checkpoint)
    notes = []
    if checkpoint is None:
        randomize_batchnorm(model, args.seed)
        notes.append(f"BN statistics and affine parameters randomised (no checkpoint; seed {args.seed})")
    x = make_input(model, args.batch, _input_size(args.input_size, model), args.seed)
    report = check_parity(model, x, backend=args.backend, modes=modes, dtype=args.dtype, device=device,
                          steps=args.steps, allow_unfused=args.allow_unfused, seed=args.seed, name=name)
    report.notes[:0] = notes
    return report


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"--modes takes a comma-separated list of {', '.join(MODES)}; got {text!r}")
    return modes


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


# ----- the model ----------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> tuple[nn.Module | None, str]:
    """(model, its name for the report); (None, "") when only a pickled checkpoint gives one."""
    if args.model:
        return _torchvision_model(args.model), f"{args.model} (torchvision)"
    if args.timm:
        return _timm_model(args.timm), f"{args.timm} (timm)"
    if args.factory:
        return _factory_model(args.factory), f"{args.factory} (factory)"
    if not args.checkpoint:
        raise UsageError("name a model: --model NAME (torchvision), --timm NAME or --factory MODULE:FUNCTION")
    return None, ""


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise UsageError(f"unknown torchvision classification model {name!r}{_did_you_mean(name, names)}")
    return torchvision.models.get_model(name, weights=None)


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UsageError("--timm needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise UsageError(f"unknown timm model {name!r}{_did_you_mean(name, timm.list_models())}")
    return timm.create_model(name, pretrained=False)


def _did_you_mean(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _factory_model(spec: str) -> nn.Module:
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise UsageError(f"--factory {spec!r}: expected MODULE:FUNCTION (e.g. mypkg.models:build)")
    module = _import_factory_module(module_name, spec)
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise UsageError(f"--factory {spec!r}: {module_name} has no callable {function_name!r}")
    try:
        model = factory()
    except Exception as e:  # the user's constructor: its error, in one line
        raise UsageError(f"--factory {spec!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--factory {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _import_factory_module(module_name: str, spec: str) -> Any:
    """A dotted module importable from the current directory (a console script's sys.path does
    not hold it), or a .py file."""
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"--factory {spec!r}: no such file {module_name}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as e:  # ImportError, or whatever the module raises at import
        raise UsageError(f"--factory {spec!r}: cannot import {module_name}: {type(e).__name__}: {e}") from None


# ----- the checkpoint -----------------------------------------------------------------


def load_checkpoint(path: str, trust: bool) -> dict[str, torch.Tensor] | nn.Module:
    """A state_dict (weights_only=True), or a pickled model when `trust` (weights_only=False)."""
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if needs is None:  # not a pickle of anything: garbage, a truncated file
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise UsageError(f"cannot read checkpoint {path}: "
                             f"{detail[1].strip() if detail else _first_line(e)}") from None
        if not trust:
            raise UsageError(f"checkpoint {path} is not a plain state_dict: it pickles {needs[1]}, which "
                             f"torch.load(weights_only=True) refuses; if it is a pickled model you trust, pass "
                             f"--trust-checkpoint (loading it runs code from the file)") from None
        obj = _load_trusted(path)
    except Exception as e:  # a truncated zip, a directory, not a torch file at all
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}") from None
    return _state_dict_or_model(obj, path)


def _load_trusted(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # the pickle's own code may raise anything
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}") from None


def _state_dict_or_model(obj: Any, path: str) -> dict[str, torch.Tensor] | nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if not isinstance(obj, dict):
        raise UsageError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict or an nn.Module")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = next((obj[k] for k in _STATE_DICT_KEYS if isinstance(obj.get(k), (dict, nn.Module))), None)
        if nested is None:
            raise UsageError(f"checkpoint {path} is a dict but not a state_dict (keys {_some(list(obj))}; the "
                             f"weights may be nested under one of {', '.join(_STATE_DICT_KEYS)})")
        return _state_dict_or_model(nested, path)
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _apply_checkpoint(model: nn.Module | None, name: str, checkpoint: dict | nn.Module | None,
                      path: str | None) -> tuple[nn.Module, str]:
    if checkpoint is None:
        return model, name
    if isinstance(checkpoint, nn.Module):
        if model is None:
            return checkpoint, f"{type(checkpoint).__name__} (pickled in {path})"
        checkpoint = checkpoint.state_dict()
    if model is None:
        raise UsageError(f"checkpoint {path} is a state_dict: name the model it belongs to "
                         f"(--model, --timm or --factory)")
    try:
        result = model.load_state_dict(checkpoint, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise UsageError(f"checkpoint {path} does not match the model: {_first_line(e, skip_header=True)}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing key(s): {_some(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected key(s): {_some(result.unexpected_keys)}")
    if problems:
        raise UsageError(f"checkpoint {path} does not match the model: {'; '.join(problems)}")
    return model, f"{name}, checkpoint {path}"


def _some(items: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ----- the inputs ---------------------------------------------------------------------


def _input_size(text: str | None, model: nn.Module) -> tuple[int, int]:
    if text is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        return (size[-2], size[-1]) if size else (DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise UsageError(f"--input-size {text!r}: expected S or HxW with positive integers (e.g. 224 or 224x160)")
    return (sizes[0], sizes[-1])


def make_input(model: nn.Module, batch: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Seeded random float64 images (batch, C, H, W), C = the first convolution's in_channels."""
    conv = first_conv(model)
    if conv is None:
        raise UsageError(f"{type(model).__name__} has no nn.Conv2d: fusedres-check takes image models "
                         f"(N, C, H, W inputs)")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, conv[1].in_channels, *size), generator=gen, dtype=torch.float64)


def _first_line(e: BaseException, skip_header: bool = False) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if skip_header and len(lines) > 1:
        return "; ".join(lines[1:4]) + (" ..." if len(lines) > 4 else "")
    return lines[0] if lines else repr(e)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
