"""python -m fusedres.bench.ddp on two CPU ranks (gloo): the record's rows, gate and counts."""

from __future__ import annotations

import json

from fusedres.bench import ddp
from fusedres.bench.workload import build_model


def test_two_ranks_rows_gate_and_collective_counts(tmp_path, capsys):
    out = tmp_path / "ddp.json"
    record = ddp.main(["--world-size", "2", "--model", "resnet18", "--batch", "2", "--image", "32",
                       "--steps", "2", "--warmup", "1", "--json", str(out), "--timeout", "120"])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(record["rows"], default=str))
    text = capsys.readouterr().out
    assert "world size 2 (gloo)" in text and "thread(s)/rank" in text

    rows = {r["key"]: r for r in record["rows"]}
    assert list(rows) == list(ddp.ROWS)
    assert rows["eager_syncbn_ddp"]["status"] == "skipped" and "GPU only" in rows["eager_syncbn_ddp"]["reason"]
    for key in ("eager_ddp", "fused_ddp", "fused_syncbn"):
        row = rows[key]
        assert row["status"] == "ok", row
        assert row["ranks_agree"]
        assert len(row["times_ms_per_rank"]) == 2 and all(len(t) == 2 for t in row["times_ms_per_rank"])
        s = row["summary"]
        assert 0 < s["min_ms"] <= s["median_ms"] <= s["max_ms"]
        assert row["collectives_per_step"] > 0 and row["bytes_per_step"] > 0

    n_bn = record["batch_norms"]
    assert n_bn == 20  # resnet18: the stem's, 2 per BasicBlock x 8, 3 downsample BNs
    params = sum(p.numel() for p in build_model("resnet18").parameters()) * 4
    for key in ("eager_ddp", "fused_ddp"):  # DDP: gradient buckets (all parameters) + buffer broadcast
        coll = rows[key]["collectives"]
        assert set(coll) == {"ddp_grad_bucket_allreduce", "buffer_broadcast"}
        assert coll["ddp_grad_bucket_allreduce"]["calls"] >= 1
        assert coll["ddp_grad_bucket_allreduce"]["bytes"] == params
        assert coll["buffer_broadcast"]["calls"] == 2  # one bucket of float32 stats, one of int64 counts
    sync = rows["fused_syncbn"]["collectives"]  # per BN: one all_gather forward, one all_reduce backward
    assert sync["all_gather"]["calls"] == n_bn and sync["all_reduce"]["calls"] == n_bn
    assert sync["grad_flat_allreduce"] == {"calls": 1, "bytes": params}
    assert rows["fused_syncbn"]["collectives_per_step"] == 2 * n_bn + 1
    for key in ("fused_ddp", "fused_syncbn"):
        gate = rows[key]["gate"]
        assert gate["passed"] and gate["loss_rel_error"] <= 1e-3 and gate["grad_rel_error"] >= 0
