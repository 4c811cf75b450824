"""The examples run: `examples/degradation.py --quick` end to end, in a subprocess."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NETWORKS = ("plain20", "plain56", "resnet20", "resnet56")
EPOCH_KEYS = {"epoch", "lr", "train_loss", "train_error", "train_error_running", "train_loss_eval",
              "test_loss", "test_error", "elapsed_s"}


def test_degradation_quick(tmp_path):
    # Guards only: CI installs both (the `test` extra).
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # Run it as a user would: conftest turns the Triton interpreter on for CPU-only machines
    # (for the kernel tests); the example should take the package's ordinary CPU path.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "examples/degradation.py", "--quick", "--out-dir", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    png, js = out / "degradation.png", out / "degradation.json"
    assert png.is_file() and js.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    record = json.loads(js.read_text())
    assert {"config", "networks", "summary", "wall_time_s", "versions", "machine", "all_losses_finite"} <= set(record)
    assert record["config"]["quick"] is True
    assert record["all_losses_finite"] is True
    assert set(record["networks"]) == set(NETWORKS)
    epochs = record["config"]["epochs"]
    for name, net in record["networks"].items():
        assert net["depth"] == int(name[-2:]) and net["plain"] == name.startswith("plain")
        assert len(net["epochs"]) == epochs
        for e in net["epochs"]:
            assert EPOCH_KEYS <= set(e), (name, e)
            for key in ("train_loss", "train_loss_eval", "test_loss"):
                assert isinstance(e[key], float) and math.isfinite(e[key]), (name, key, e[key])
            for key in ("train_error", "train_error_running", "test_error"):
                assert 0.0 <= e[key] <= 100.0
        assert net["final_test_error"] == net["epochs"][-1]["test_error"]
        grads = net["grad_norms_at_init"]
        # One norm per conv layer: the stem plus two per block, 6n + 1 of a 6n + 2-layer network.
        assert len(grads["layers"]) == len(grads["norms"]) == net["depth"] - 1
        assert grads["layers"][0] == "conv1" and grads["layers"][-1].startswith("layer3.")
        assert all(math.isfinite(g) and g > 0 for g in grads["norms"])
    assert set(record["summary"]) == {"plain56_train_error_above_plain20", "resnet56_train_error_below_resnet20",
                                      "resnet56_train_error_not_above_resnet20"}
