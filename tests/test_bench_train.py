"""bench/train.py runs end to end on CPU (so a device session does not spend its minutes on a broken
benchmark): both rows time every phase, the op counts show DeepSpeed's extra work where it is, and the
profile comes back."""

from __future__ import annotations

from bench.train import PHASES, Options, measure
from launch.__main__ import build_config


def test_bare_and_our_rows_measure_count_and_profile(tmp_path) -> None:
    cfg = build_config("mnist_distarc", ["data.uint8_batches=true", "slurm.tasks_per_node=1"]).resolved()
    opts = Options(steps=2, warmup=1, count_ops=True, profile=True, trace_dir=str(tmp_path))
    bare = measure("bare", cfg, 1, opts, str(tmp_path / "bare.json"))
    ours = measure("ours", cfg, 1, opts)
    for row in (bare, ours):
        assert row["step_s"] > 0 and row["mem_mb"] > 0
        assert set(PHASES) <= set(row["phases"]) and all(row["phases"][k] > 0 for k in PHASES)
        assert all(row["ops"].get(k, 0) > 0 for k in ("forward", "backward", "optimizer"))
        assert "aten::" in row["profile"]["table"] and row["profile"]["busy"] is None  # no GPU here
    # the same network: the same forward; ZeRO's gradient hooks and checks add ops after it
    assert ours["ops"]["forward"] == bare["ops"]["forward"]
    assert ours["ops"]["backward"] > bare["ops"]["backward"]
    assert (tmp_path / "bare.json").stat().st_size > 0
