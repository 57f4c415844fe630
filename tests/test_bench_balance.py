"""bench/balance.py's measurement on a small SOP-shaped split: its figures are what the stream produced."""

from __future__ import annotations

from bench.balance import measure, sop_like_split
from data.config import DataConfig
from data.convert.common import convert


def test_measure_counts_what_the_slots_made(tmp_path) -> None:
    split, counts = sop_like_split(150, 2, 12)
    assert len(counts) == 150 and counts.min() >= 2 and counts.max() <= 12 and len(split.items) == counts.sum()
    rows = {}
    for order in ("shuffled", "class"):
        convert("sop_like", str(tmp_path / order), [split], 25, progress=False, order=order)
        cfg = DataConfig(
            root=str(tmp_path / order), num_classes=150, batch_size=8, samples_per_class=2, balance_buffer=32
        )
        rows[order] = measure(cfg, 4, 2, counts)
        assert 0 < rows[order]["used"] <= 1 and 0 < rows[order]["classes"] <= 1
    # Class order: nearly every image read makes a batch, nearly every class one; shuffled shards lose many.
    assert rows["class"]["used"] > 0.8 and rows["class"]["classes"] > 0.95
    assert rows["shuffled"]["used"] < rows["class"]["used"] - 0.2
