"""fusedres-check (fusedres/check.py): models by name, factories, checkpoints, exit codes.

Most tests call `main(argv)` in-process; two run `python -m fusedres.check` as CI does.
Fast settings (`--modes eval --dtype float64 --input-size 32`) where only the plumbing is
under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import _single_intra_op_thread  # noqa: F401  (autouse fixture: imported, it applies to this module)
from torchvision.models import resnet as tv_resnet

from fusedres.backends.torch_backend import TorchBackend
from fusedres.check import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--modes", "eval", "--dtype", "float64", "--input-size", "32"]

FACTORIES = '''
import torch
from torch import nn
from torchvision.models import resnet


def narrow():
    model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    return model


def gray():
    model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model


def plain_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _NoHalf(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = narrow()

    def forward(self, x):
        if x.dtype == torch.float16:
            raise RuntimeError("\\"slow_conv2d_cpu\\" not implemented for 'Half'")
        return self.net(x)


def no_half():
    return _NoHalf()


def broken():
    raise OSError("weights server unreachable")


NOT_CALLABLE = 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module `user_models` with constructors, importable from the current directory."""
    (tmp_path / "user_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "user_models", raising=False)
    return tmp_path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusedres-check: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_torchvision_model_passes_and_writes_json(capsys, tmp_path):
    path = tmp_path / "parity.json"
    code, out, err = run_main(capsys, "--model", "resnet18", "--input-size", "64", "--json", str(path))
    assert code == 0, out + err
    assert "fusion coverage: 8 of 8 blocks fused, stem fused" in out
    assert "BN statistics and affine parameters randomised (no checkpoint; seed 0)" in out
    assert "float64 and float32" in out and "PASS" in out
    data = json.loads(path.read_text())
    assert data["ok"] and data["dtype"] == "float32" and data["coverage"]["blocks"] == 8
    assert {c["mode"] for c in data["comparisons"]} == {"eval", "train"}


def test_timm_model(capsys):
    pytest.importorskip("timm")
    code, out, err = run_main(capsys, "--timm", "resnet18", "--input-size", "64", "--dtype", "bfloat16")
    assert code == 0, out + err
    assert "resnet18 (timm)" in out and "8 of 8 blocks fused" in out


def test_unknown_names_are_usage_errors(capsys):
    assert_usage_error(*run_main(capsys, "--model", "resnet5")[::2], "unknown torchvision classification model "
                       "'resnet5'", "did you mean", "resnet50")
    pytest.importorskip("timm")
    assert_usage_error(*run_main(capsys, "--timm", "resnet-18")[::2], "unknown timm model 'resnet-18'")


@pytest.mark.parametrize("argv,fragment", [
    ([], "name a model"),
    (["--model", "resnet18", "--modes", "eval,predict"], "--modes"),
    (["--model", "resnet18", "--input-size", "big"], "--input-size 'big'"),
    (["--model", "resnet18", "--batch", "0"], "at least 1"),
    (["--model", "resnet18", "--device", "tpu"], "--device tpu"),
], ids=["no-model", "modes", "input-size", "batch", "device"])
def test_bad_arguments(capsys, argv, fragment):
    assert_usage_error(*run_main(capsys, *argv)[::2], fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    assert_usage_error(*run_main(capsys, "--model", "resnet18", "--device", "cuda")[::2], "no CUDA device")


def test_argparse_errors_exit_2(capsys):
    code, _, err = run_main(capsys, "--model", "resnet18", "--dtype", "int8")
    assert code == 2 and "invalid choice" in err
    assert run_main(capsys, "--help")[0] == 0


def _resnet18_state(num_classes: int = 1000) -> dict[str, torch.Tensor]:
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
], ids=["plain", "nested", "ddp"])
def test_checkpoint_state_dict(capsys, tmp_path, wrap):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(_resnet18_state()), path)
    code, out, err = run_main(capsys, "--model", "resnet18", "--checkpoint", str(path), *FAST)
    assert code == 0, out + err
    assert "randomised" not in out and f"checkpoint {path}" in out


def test_checkpoint_with_wrong_keys_names_them(capsys, tmp_path):
    sd = _resnet18_state()
    del sd["fc.weight"], sd["fc.bias"]
    sd["head.weight"] = torch.zeros(3)
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    code, _, err = run_main(capsys, "--model", "resnet18", "--checkpoint", str(path))
    assert_usage_error(code, err, "does not match the model", "2 missing key(s): fc.weight, fc.bias",
                       "1 unexpected key(s): head.weight")
    torch.save(_resnet18_state(num_classes=10), path)
    code, _, err = run_main(capsys, "--model", "resnet18", "--checkpoint", str(path))
    assert_usage_error(code, err, "does not match the model", "size mismatch for fc.weight")


def test_unreadable_checkpoints(capsys, tmp_path):
    code, _, err = run_main(capsys, "--model", "resnet18", "--checkpoint", str(tmp_path / "missing.pt"))
    assert_usage_error(code, err, "no such file")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    code, _, err = run_main(capsys, "--model", "resnet18", "--checkpoint", str(garbage))
    assert_usage_error(code, err, "cannot read checkpoint")
    assert "--trust-checkpoint" not in err
    torch.save([1, 2, 3], garbage)
    code, _, err = run_main(capsys, "--model", "resnet18", "--checkpoint", str(garbage))
    assert_usage_error(code, err, "holds a list, not a state_dict")


def test_pickled_model_needs_trust(capsys, tmp_path, factories):
    path = tmp_path / "whole_model.pt"
    torch.save(tv_resnet.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10), path)
    code, _, err = run_main(capsys, "--checkpoint", str(path))
    assert_usage_error(code, err, "not a plain state_dict: it pickles torchvision.models.resnet.ResNet",
                       "--trust-checkpoint")
    code, out, err = run_main(capsys, "--checkpoint", str(path), "--trust-checkpoint", *FAST)
    assert code == 0, out + err
    assert "4 of 4 blocks fused" in out
    code, out, err = run_main(capsys, "--factory", "user_models:narrow", "--checkpoint", str(path),
                              "--trust-checkpoint", *FAST)
    assert code == 0, out + err


def test_factory(capsys, factories):
    code, out, err = run_main(capsys, "--factory", "user_models:narrow", "--input-size", "32", "--modes", "train")
    assert code == 0, out + err
    assert "user_models:narrow (factory)" in out and "4 of 4 blocks fused" in out
    # A file path works too; the input's channels follow the model's first convolution.
    code, out, err = run_main(capsys, "--factory", f"{factories / 'user_models.py'}:gray", *FAST)
    assert code == 0, out + err
    assert "inputs (2, 1, 32, 32)" in out


@pytest.mark.parametrize("spec,fragment", [
    ("user_models", "expected MODULE:FUNCTION"),
    ("no_such_module:build", "cannot import no_such_module: ModuleNotFoundError"),
    ("user_models:missing", "has no callable 'missing'"),
    ("user_models:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
    ("user_models:broken", "raised OSError: weights server unreachable"),
    ("missing.py:build", "no such file missing.py"),
])
def test_bad_factories(capsys, factories, spec, fragment):
    assert_usage_error(*run_main(capsys, "--factory", spec)[::2], fragment)


def test_nothing_to_fuse_exits_1_unless_allowed(capsys, factories):
    code, out, _ = run_main(capsys, "--factory", "user_models:plain_cnn", *FAST)
    assert code == 1
    assert "0 of 0 blocks fused" in out and "FAIL" in out
    assert run_main(capsys, "--factory", "user_models:plain_cnn", "--allow-unfused", *FAST)[0] == 0


def test_low_precision_the_model_cannot_run_is_a_usage_error(capsys, factories):
    code, _, err = run_main(capsys, "--factory", "user_models:no_half", "--dtype", "float16", "--input-size", "32")
    assert_usage_error(code, err, "cannot run", "float16", "not implemented for 'Half'")


def test_parity_failure_exits_1(capsys, monkeypatch):
    def broken(self, inputs):
        out, mask = TorchBackend.__mro__[1].scale_bias_act(self, inputs)
        return out + 1e-3, mask

    monkeypatch.setattr(TorchBackend, "scale_bias_act", broken)
    code, out, _ = run_main(capsys, "--model", "resnet18", "--backend", "torch", "--modes", "train",
                            "--input-size", "32")
    assert code == 1
    assert "FAIL" in out and "train float64 output output" in out


def _module_run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "fusedres.check", *argv], capture_output=True, text=True,
                          env=env, timeout=300)


def test_python_dash_m_exit_codes():
    ok = _module_run("--model", "resnet18", *FAST)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout
    bad = _module_run("--model", "resnet5")
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("fusedres-check: error: unknown torchvision") and "Traceback" not in bad.stderr


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fusedres-check"] == "fusedres.check:main"

