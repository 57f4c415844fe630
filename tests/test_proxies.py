"""Class ranges cover every class exactly once; initial rows do not depend on the world size."""

from __future__ import annotations

import pytest
import torch

from model.proxies import INIT_BLOCK, class_range, init_rows


@pytest.mark.parametrize("num_classes", [0, 1, 3, 7, 10, 64, 1000, 85_742, 1_000_003])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 64])
def test_class_ranges_partition_all_classes(num_classes: int, world: int) -> None:
    ranges = [class_range(num_classes, r, world) for r in range(world)]
    expected_start = 0
    for start, count in ranges:
        assert start == expected_start and count >= 0
        expected_start += count
    assert expected_start == num_classes
    counts = [c for _, c in ranges]
    assert max(counts) - min(counts) <= 1  # balanced


def test_class_range_rejects_bad_queries() -> None:
    with pytest.raises(ValueError):
        class_range(10, 2, 2)
    with pytest.raises(ValueError):
        class_range(10, 0, 0)


def test_init_rows_same_whatever_the_slicing() -> None:
    num_classes = 2 * INIT_BLOCK + 17
    full = init_rows(5, 0, num_classes, (3,))
    for world in (1, 2, 3, 7):
        parts = [init_rows(5, *class_range(num_classes, r, world), (3,)) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(init_rows(6, 0, 4, (3,)), full[:4])  # the seed matters
    assert not torch.equal(full[0], full[INIT_BLOCK])  # blocks use different generators
