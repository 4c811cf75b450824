"""The smoke check (fusedres.bench.smoke) and the summary of a gpu_check folder, on the CPU at tiny sizes."""

import json

import pytest
import torch

import fusedres
from fusedres import ext
from fusedres.backends import tuning
from fusedres.bench import smoke, summary

# resnet18 at 64 px, batch 4: fewer values per channel make train-mode BN so ill-conditioned that eager
# fp32 itself is off by percents (see test_bench.py).
TINY = ["--batch", "4", "--image-size", "64", "--block-size", "4"]


def _by_who(lines: list[str]) -> dict[tuple[str, str, str], str]:
    """(case, mode, who) -> status."""
    out = {}
    for line in lines:
        status, case, mode, who, _dtype = line.split(" | ")[0].split()
        out[(case.split("-")[0], mode, who)] = status
    return out


def test_smoke_writes_one_line_per_case(tmp_path):
    out = tmp_path / "smoke.txt"
    lines = smoke.run(["--out", str(out), *TINY, "--backends", "auto", "torch", "cuda"], stream=open("/dev/null", "w"))
    assert out.read_text().splitlines() == lines
    status = _by_who(lines)
    assert set(status) == {(c, m, w) for c in ("resnet18", "resnet50.layer2.0") for m in smoke.MODES
                           for w in ("eager", "auto", "torch", "cuda")}
    for (case, mode, who), s in status.items():
        if who == "cuda" and ext.load_error():
            assert s == "UNAVAILABLE"
        else:
            assert s == "PASS", (case, mode, who, lines)
    train = next(line for line in lines if " train torch " in line)
    assert "input_grad" in train and "param_grads" in train


def test_smoke_runs_triton_in_the_interpreter(tmp_path):
    # conftest sets TRITON_INTERPRET=1 on a CPU before fusedres is imported.
    lines = smoke.run(["--out", str(tmp_path / "s.txt"), *TINY, "--cases", "bottleneck", "--modes", "eval",
                       "--backends", "triton"], stream=open("/dev/null", "w"))
    assert [line.split()[0] for line in lines] == ["PASS", "PASS"], lines


def test_smoke_reports_a_wrong_backend_as_failed(tmp_path, monkeypatch):
    real_convert = fusedres.convert

    def skewed_convert(module, backend="auto", inplace=False):
        fused = real_convert(module, backend=backend, inplace=inplace)
        forward = fused.forward
        fused.forward = lambda x: forward(x) * 1.01  # a 1% error: far above fp32 noise
        return fused

    monkeypatch.setattr(fusedres, "convert", skewed_convert)
    lines = smoke.run(["--out", str(tmp_path / "s.txt"), *TINY, "--cases", "bottleneck", "--backends", "torch"],
                      stream=open("/dev/null", "w"))
    status = _by_who(lines)
    assert status[("resnet50.layer2.0", "eval", "torch")] == "FAIL"
    assert status[("resnet50.layer2.0", "train", "torch")] == "FAIL"
    assert status[("resnet50.layer2.0", "eval", "eager")] == "PASS"
    with pytest.raises(SystemExit):
        smoke.main(["--out", str(tmp_path / "s2.txt"), *TINY, "--cases", "bottleneck", "--modes", "eval",
                    "--backends", "torch"])


def test_summary_of_a_gpu_check_folder(tmp_path, capsys):
    (tmp_path / "stages.tsv").write_text("smoke\t0\t12\t90\t\ntune\t124\t150\t150\thit the time cap\n"
                                         "blocks\t-\t\t100\tstarted\n")
    (tmp_path / "smoke.txt").write_text("PASS        r eval auto bf16 | output 1e-3<=2e-3 | (1.0 s)\n"
                                        "FAIL        r eval triton bf16 | output 9e-3>2e-3 | (1.0 s)\n")
    (tmp_path / "triton-cache-tuned.txt").write_text("100 a/_conv_kernel.json\n2000 a/_conv_kernel.cubin\n"
                                                    "50 a/__grp___conv_kernel.json\n")
    # Two tuner results written the way the tuner writes them.
    tuner = tuning.Tuner(directory=tmp_path / "fusedres-cache" / "dispatch", device_name=lambda d: "NVIDIA H200")
    x, w = torch.empty(256, 64, 56, 56), torch.empty(64, 64, 3, 3)
    key = tuner.key("conv_bias_act", [x, w, None, None, None, None, [1, 1], [1, 1], [1, 1], 1, [1, 1], True],
                    ["triton", "torch"])
    tuner._write(tuner.path(key), key, "torch", {"triton": 0.5, "torch": 0.25})
    key = tuner.key("conv_backward", [x, x, w, [1, 1], [1, 1], [1, 1], 1, True, True], ["aten", "triton"])
    tuner._write(tuner.path(key), key, "triton", {"aten": 1.0, "triton": 0.8})
    summary.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "TIMEOUT" in out and "CUT" in out
    assert "1 PASS, 1 FAIL, 0 UNAVAILABLE of 2 cases" in out
    assert "-- conv_bias_act (1 shapes, NVIDIA H200, float32)" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("256x64x56x56") and "+res" not in line
               and "torch" in line)
    assert "0.5000" in row and "0.2500" in row and "2.00x" in row
    assert "triton wins 1 of 1" in out  # conv_backward
    assert "triton-cache-tuned: 1 kernels, 0.0 MiB" in out
    saved = next((tmp_path / "fusedres-cache" / "dispatch").glob("conv_backward-*.json"))
    assert json.loads(saved.read_text())["winner"] == "triton"
