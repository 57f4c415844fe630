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


def test_synthetic_jpeg_shards_feed_the_recipes_loader(tmp_path) -> None:
    """--data shards: the recipe's own loader reads the written set, all classes counted."""
    import json

    from bench.data import write_jpeg_shards
    from data.stream import build_train_loader
    from launch.recipes import get_recipe
    from train.overrides import apply_overrides

    raw = apply_overrides(get_recipe("vitl_ms1mv2_faces"), ["data.num_workers=0", "data.batch_size=8"])
    write_jpeg_shards(raw.data, str(tmp_path), images=128, classes=500, source="")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_classes"] == 500 and manifest["splits"]["train"]["num_samples"] == 128
    cfg = apply_overrides(raw, [f"data.root={tmp_path}", "data.prepare=none"]).resolved()
    assert cfg.data.num_classes == 500
    loader = build_train_loader(cfg.data, 0, 1)
    try:
        images, labels = next(iter(loader))
    finally:
        loader.close()
    assert tuple(images.shape) == (8, 3, 112, 112) and labels.max() < 500


def test_gpu_busy_time_counts_overlapping_kernels_once() -> None:
    from bench.instruments import covered_us

    assert covered_us([]) == 0.0
    assert covered_us([(0, 10), (20, 25)]) == 15  # a gap is idle time
    assert covered_us([(0, 10), (5, 15), (6, 7)]) == 15  # two streams at once: counted once
    assert covered_us([(30, 40), (0, 10), (10, 30)]) == 40  # order does not matter
