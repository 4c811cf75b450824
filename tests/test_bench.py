"""The benchmark CLI: parity gate, records, folding baseline, roofline arithmetic (no timing asserts)."""

import json
from pathlib import Path

import pytest
import torch

import fusedres
from fusedres import ext
from fusedres.bench import cli, measure, report, roofline
from fusedres.bench.candidates import ALL_CANDIDATES, YARDSTICK, Runner, build_candidates
from fusedres.bench.cudnn_fused import CudnnFusedResNet, reference_ops
from fusedres.bench.workload import Workload, block_stages, build_model

TINY = ["--model", "resnet18", "--batch", "2", "--image-size", "32", "--repeats", "2", "--no-progress"]


def _rows(run: dict) -> dict[str, dict]:
    return {r["key"]: r for r in run["candidates"]}


def test_cli_inference_record_and_table(tmp_path, capsys, monkeypatch):
    from torch._inductor import freezing

    frozen = []  # inductor's freeze() runs once per graph compiled with freezing
    real_freeze = freezing.freeze
    monkeypatch.setattr(freezing, "freeze", lambda *a, **k: frozen.append(1) or real_freeze(*a, **k))
    record = cli.run([*TINY, "--candidates", "eager_nchw_fp32", "compile", "compile_freezing", "fusedres_torch",
                      "fusedres_cuda", "cudnn_fused", "--out-dir", str(tmp_path), "--name", "t"])
    out = capsys.readouterr().out
    run = record["runs"][0]
    rows = _rows(run)
    # The yardstick always runs, even when not asked for.
    assert [r["key"] for r in run["candidates"]] == [
        "eager_nchw_fp32", "eager_cl", "compile", "compile_freezing", "cudnn_fused", "fusedres_torch", "fusedres_cuda"]
    built = not ext.load_error()  # the cuda backend runs the extension's C++ kernels on the CPU
    for key in ("eager_nchw_fp32", "eager_cl", "compile", "compile_freezing", "fusedres_torch",
                *(("fusedres_cuda",) if built else ())):
        row = rows[key]
        assert row["status"] == "ok", row
        assert len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"])
        assert row["parity"]["errors"]["logits"] <= row["parity"]["tolerance"]["logits"]
        assert set(row["speedup"]) == {"eager_nchw_fp32", "eager_cl", "compile", "compile_freezing"}
        assert row["memory"]["peak_step_MiB"] is not None  # measured for compiled rows too (RSS)
        if not key.startswith("compile"):
            assert row["memory"]["peak_step_MiB"] > 0
        assert row["label"] in out
    if not built:
        assert rows["fusedres_cuda"]["status"] == "unavailable"
        assert "fusedres._C" in rows["fusedres_cuda"]["reason"]
    assert rows["cudnn_fused"]["status"] == "unavailable"
    # The freezing row compiled its own, frozen graph (not the plain compile row's, which dynamo
    # would reuse for an equal backend), and its compile time is printed under the table.
    assert len(frozen) == 1
    for key in ("compile", "compile_freezing"):
        assert rows[key]["first_call_s"] > 0
        assert "inductor_cache_files" in rows[key]["first_call_caches"]
    first_call_line = next(line for line in out.splitlines() if line.startswith("first call"))
    assert f"compile_freezing {rows['compile_freezing']['first_call_s']:.1f}" in first_call_line
    assert run["flops_per_image"] == pytest.approx(2 * 1.8e9 * (32 / 224) ** 2, rel=0.05)
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["runs"][0]["candidates"][1]["times_ms"] == rows["eager_cl"]["times_ms"]
    assert saved["environment"]["torch"] == torch.__version__
    assert (tmp_path / "t.png").stat().st_size > 0


def test_cli_training_checks_gradients(tmp_path):
    # batch 4 at 64x64: with fewer values per channel in layer4, train-mode BN is so ill-conditioned
    # that fp32 eager NCHW and channels_last disagree by percents in the gradients.
    argv = ["--model", "resnet18", "--batch", "4", "--image-size", "64", "--repeats", "2", "--no-progress"]
    record = cli.run([*argv, "--mode", "training", "--candidates", "fusedres_torch", "--out-dir", str(tmp_path),
                      "--no-chart"])
    rows = _rows(record["runs"][0])
    assert set(rows) == {"eager_cl", "fusedres_torch"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert set(row["parity"]["errors"]) == {"logits", "grads"}
        assert row["parity"]["errors"]["grads"] < 1e-4
    assert record["runs"][0]["flops_per_iteration"] == 3 * 4 * record["runs"][0]["flops_per_image"]


def test_cli_reports_a_wrong_candidate_as_failed_and_does_not_time_it(tmp_path, monkeypatch):
    original = Runner.check

    def skewed_check(self):
        logits, grads = original(self)
        if isinstance(self.params.layer1[0], fusedres.BasicBlock):
            logits = logits * 1.01  # a 1% error: far above fp32 noise
        return logits, grads

    monkeypatch.setattr(Runner, "check", skewed_check)
    record = cli.run([*TINY, "--candidates", "fusedres_torch", "--out-dir", str(tmp_path), "--no-chart"])
    rows = _rows(record["runs"][0])
    assert rows["eager_cl"]["status"] == "ok"
    assert rows["fusedres_torch"]["status"] == "failed"
    assert "parity" in rows["fusedres_torch"]["reason"]
    assert "times_ms" not in rows["fusedres_torch"]


def _tiny_candidates(mode: str, device: str) -> dict:
    work = Workload("resnet18", 1, "fp32", mode, 32, torch.device(device))
    x, labels = torch.randn(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)  # building moves nothing
    return {c.key: c for c in build_candidates(build_model("resnet18"), work, x, labels, ALL_CANDIDATES)}


def test_compile_freezing_is_the_cpu_inference_row():
    cpu = _tiny_candidates("inference", "cpu")
    assert cpu["compile_freezing"].unavailable is None
    assert cpu["compile_freezing"].label == "compile default+freezing, CL fp32"
    assert "GPU only" in cpu["compile_max_autotune"].unavailable
    assert "inference only" in _tiny_candidates("training", "cpu")["compile_freezing"].unavailable
    gpu = _tiny_candidates("inference", "cuda")  # on a GPU: as before, freezing is max-autotune's
    assert "CPU only" in gpu["compile_freezing"].unavailable
    assert gpu["compile_max_autotune"].unavailable is None


def test_cli_freezing_row_cpu_info_and_no_profiler(tmp_path, capsys, monkeypatch):
    """With torch.compile faked (a real compile takes tens of seconds): the freezing row asks for
    freezing and makes its first call without autograd; the CPU memory is measured without
    torch.profiler (its kineto backend prints to stderr); the JSON describes the CPU."""
    calls = []

    def fake_compile(model, **kwargs):
        def compiled(x):
            calls.append({"kwargs": kwargs, "grad": torch.is_grad_enabled()})
            return model(x)
        return compiled

    def no_profiler(*args, **kwargs):
        raise AssertionError("torch.profiler must not run")

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.profiler, "profile", no_profiler)
    monkeypatch.setattr(torch.autograd.profiler, "profile", no_profiler)
    record = cli.run([*TINY, "--candidates", "compile_freezing", "--out-dir", str(tmp_path), "--name", "f",
                      "--no-chart"])
    out = capsys.readouterr().out
    rows = _rows(record["runs"][0])
    assert rows["compile_freezing"]["status"] == "ok", rows["compile_freezing"]
    assert calls[0] == {"kwargs": {"options": {"freezing": True}}, "grad": False}
    for row in rows.values():
        assert row["memory"]["peak_step_MiB"] is not None and row["memory"]["peak_step_MiB"] >= 0
        assert "RSS" in row["memory"]["method"]
    assert "compile_freezing" in next(line for line in out.splitlines() if line.startswith("first call"))

    env = json.loads((tmp_path / "f.json").read_text())["environment"]
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu_capability"] in out.splitlines()[0]
    assert env["cpu_threads"] == torch.get_num_threads()
    assert env["cpu"]
    if Path("/proc/cpuinfo").exists():
        flags = set(Path("/proc/cpuinfo").read_text().split("\n\n")[0].split())
        assert env["cpu_flags"] == {f: f in flags for f in report.CPU_FLAGS}
        assert {"avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile"} <= set(env["cpu_flags"])


def test_peak_rss_growth_sees_a_new_allocation():
    if measure.peak_rss_growth(lambda: None) is None:
        pytest.skip("needs Linux with glibc")
    grown = measure.peak_rss_growth(lambda: torch.ones(64 * 2**20 // 4).sum())  # 64 MiB, touched
    assert grown >= 48 * 2**20


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--repeats", "0"], ["--model", "vgg16"], ["--dtype", "int8"]])
def test_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cudnn_baseline_folding_matches_torchvision(name):
    model = build_model(name).double().eval()
    fused = CudnnFusedResNet(model, torch.float64, **reference_ops())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        actual = fused(x)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-10


def test_block_stages_match_design_numbers():
    """DESIGN.md: ResNet-50 is 8.18 GFLOP and ~23 MB of block-fused bf16 traffic per image."""
    stages = block_stages(build_model("resnet50"), 224)
    assert len(stages) == 1 + 16 + 1
    assert sum(s.flops for s in stages) == pytest.approx(8.18e9, rel=1e-3)
    assert sum(s.elements_moved for s in stages) * 2 == pytest.approx(23.2e6, rel=0.01)
    assert [s.name for s in stages][1:4] == ["layer1.0", "layer1.1", "layer1.2"]


def test_roofline_takes_the_slower_roof_per_stage():
    stages = block_stages(build_model("resnet18"), 64)
    fast_memory = roofline.roofline_images_per_second(stages, 2, 1e12, 1e18)
    fast_compute = roofline.roofline_images_per_second(stages, 2, 1e18, 1e9)
    assert fast_memory == pytest.approx(1e12 / sum(s.flops for s in stages), rel=1e-3)
    assert fast_compute == pytest.approx(1e9 / (2 * sum(s.elements_moved for s in stages)), rel=1e-3)
    assert roofline.roofline_images_per_second(stages, 2, None, 1e9) is None
    assert roofline.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 790e12
    assert roofline.peak_flops("AMD EPYC", "bf16") is None
    assert roofline.measure_copy_bandwidth(torch.device("cpu")) is None


def test_parity_tolerance_follows_the_yardstick():
    yard = {"logits": 1e-2, "grads": 2e-2}
    assert measure.parity_tolerance("bf16", {"logits": 0.0}, yard) == {"logits": 3e-2}
    assert measure.parity_tolerance("bf16", yard, yard) == {"logits": 3e-2, "grads": 4e-2}
    assert measure.parity_tolerance("fp32", {"logits": 0.0}, None) == {"logits": measure.YARDSTICK_CAP["fp32"]}
    assert not measure.passes({"logits": float("nan")}, {"logits": 1.0})


def test_parity_gate_fails_a_row_beyond_the_yardstick_tolerance_and_drops_its_runner():
    ref = measure.Reference(torch.tensor([[1.0, -2.0, 4.0]]), {})
    rows = [{"key": YARDSTICK, "_outputs": (ref.logits * (1 + 1e-6), {})},
            {"key": "close", "_outputs": (ref.logits * (1 + 1e-5), {})},  # within the fp32 floor, 1e-4
            {"key": "wrong", "_outputs": (ref.logits * 1.01, {})},
            {"key": "broken", "status": "error"}]  # never ran: no outputs, no runner
    runners = {YARDSTICK: object(), "close": object(), "wrong": object()}
    cli._gate_parity(rows, runners, ref, "fp32")
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "error"]
    assert set(runners) == {YARDSTICK, "close"}
    assert rows[0]["parity"]["tolerance"] == {"logits": measure.YARDSTICK_CAP["fp32"]}
    assert rows[1]["parity"]["tolerance"] == {"logits": measure.PARITY_FLOOR["fp32"]}
    assert rows[2]["reason"] == "parity: logits error 1.00e-02 > 1.00e-04"
    assert not any("_outputs" in r for r in rows) and "parity" not in rows[3]


def test_timed_rows_get_throughput_fractions_and_speedups_over_timed_baselines():
    costs = cli._Costs(stages=[], flops_per_image=1e9, flops_per_iter=4e9, element_bytes=2, peak=8e12,
                       roof_ips=400.0, copy_bandwidth=None)
    rows = [{"key": "a", "kind": "baseline"}, {"key": "b", "kind": "fusedres"}, {"key": "c", "kind": "baseline"}]
    cli._add_timings(rows, {"a": [20.0, 10.0, 30.0], "b": [5.0]}, 4, costs)  # c was not timed
    cli._add_speedups(rows)
    a, b, c = rows
    assert a["summary"]["median_ms"] == 20.0 and a["img_per_s"] == 200.0
    assert b["img_per_s"] == 800.0 and b["roofline_fraction"] == 2.0
    assert b["tflops"] == pytest.approx(0.8) and b["compute_fraction"] == pytest.approx(0.1)
    assert a["speedup"] == {"a": 1.0} and b["speedup"] == {"a": 4.0}
    assert set(c) == {"key", "kind"}


@pytest.mark.gpu
def test_cli_on_gpu_runs_cudnn_and_fusedres(tmp_path):
    record = cli.run([*TINY, "--dtype", "bf16", "--candidates", "cudnn_fused", "fusedres_torch",
                      "--out-dir", str(tmp_path), "--no-chart"])
    rows = _rows(record["runs"][0])
    assert rows["cudnn_fused"]["status"] == "ok", rows["cudnn_fused"]
    assert rows["fusedres_torch"]["status"] == "ok", rows["fusedres_torch"]
    assert record["environment"]["card"]


@pytest.mark.skipif(bool(ext.load_error()), reason=ext.load_error() or "built")
def test_kernel_benchmark_record(tmp_path):
    from fusedres.bench import kernels, summary

    out = tmp_path / "kernels.json"
    record = kernels.run(["--device", "cpu", "--batch", "1", "--shapes", "1", "--repeats", "1", "--iters", "1",
                          "--out", str(out)])
    assert [r["op"] for r in record["rows"]][:2] == ["bn_stats", "bn_stats (vs torch.var_mean)"]
    assert all(r["shape"] == [1, 64, 56, 56] and r["ext_ms"] > 0 and r["torch_ms"] > 0 for r in record["rows"])
    assert json.loads(out.read_text())["rows"][0]["bytes"] == 64 * 56 * 56 * 4
    summary.main([str(out)])


@pytest.mark.parametrize("model,mode", [("cifar_resnet20", "inference"), ("cifar_plain20", "training")])
def test_cli_runs_the_cifar_networks(tmp_path, model, mode):
    """fusedres's CIFAR networks: eager rows run their blocks' plain-module forward, fusedres
    rows the fused blocks; 32x32 and 10 classes by default; no cuDNN-fused row (torchvision only)."""
    record = cli.run(["--model", model, "--batch", "4", "--repeats", "2", "--no-progress", "--mode", mode,
                      "--candidates", "fusedres_torch", "cudnn_fused", "--out-dir", str(tmp_path), "--no-chart"])
    run = record["runs"][0]
    rows = _rows(run)
    assert run["workload"]["image_size"] == 32
    for key in ("eager_cl", "fusedres_torch"):
        assert rows[key]["status"] == "ok", rows[key]
    assert rows["cudnn_fused"]["status"] == "unavailable" and "torchvision" in rows["cudnn_fused"]["reason"]
    assert run["flops_per_image"] == pytest.approx(2 * 40.8e6, rel=0.05)  # ResNet-20: 40.8M MACs at 32x32


def test_eager_and_fused_cifar_models_differ_only_in_the_forward():
    from fusedres.bench.workload import activate_fused_blocks

    eager = build_model("cifar_preact_resnet110")
    blocks = [m for m in eager.modules() if isinstance(m, fusedres.PreActBasicBlock)]
    assert len(blocks) == 54 and all("forward" in b.__dict__ for b in blocks)
    stages = block_stages(eager, 32)
    assert [s.name for s in stages][:2] == ["stem", "layer1.0"] and len(stages) == 54 + 2
    fused = activate_fused_blocks(build_model("cifar_preact_resnet110"), "torch")
    assert not any("forward" in b.__dict__ for b in fused.modules() if isinstance(b, fusedres.PreActBasicBlock))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), eager.eval()(x), rtol=1e-4, atol=1e-4)


def test_cli_runs_the_detection_body_in_both_modes(tmp_path):
    """fpn_resnet50_body: torchvision's detection backbone body (FrozenBatchNorm2d, layers 2-4
    trainable); the fused rows fuse every block and pass the parity gate; the gradients checked
    are the trainable parameters' only."""
    record = cli.run(["--model", "fpn_resnet50_body", "--batch", "1", "--image-size", "32", "--repeats", "1",
                      "--no-progress", "--mode", "inference", "training", "--candidates", "fusedres_auto",
                      "cudnn_fused", "--out-dir", str(tmp_path), "--no-chart"])
    for run in record["runs"]:
        rows = _rows(run)
        for key in ("eager_cl", "fusedres_auto"):
            assert rows[key]["status"] == "ok", rows[key]
        assert rows["cudnn_fused"]["status"] == "unavailable"
        assert run["flops_per_image"] == pytest.approx(2 * 4.09e9 * (32 / 224) ** 2, rel=0.1)  # ResNet-50 minus fc
    assert "grads" in _rows(record["runs"][1])["fusedres_auto"]["parity"]["errors"]
    model = build_model("fpn_resnet50_body")
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert fusedres.convert(model).body.layer1[0].__class__ is fusedres.Bottleneck
