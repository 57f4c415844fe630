"""bench/capacity.py's search: the bracket it returns holds the true limit and is as narrow as asked."""

from __future__ import annotations

import pytest

from bench.capacity import largest_fitting


@pytest.mark.parametrize("limit, start", [(12_345, 1_000), (12_345, 100_000), (7, 1), (1_000_000, 1_000_000)])
def test_bracket_holds_the_limit(limit: int, start: int) -> None:
    probed: list[int] = []

    def fits(n: int) -> bool:
        probed.append(n)
        return n <= limit

    lo, hi = largest_fitting(fits, start, tolerance=0.02)
    assert lo <= limit < hi
    assert hi - lo <= max(1.0, 0.02 * hi)
    assert len(probed) <= 40  # doubling + bisection, not a linear scan
    assert all(n <= limit for n in probed if n <= lo) and not any(n <= limit for n in probed if n >= hi)


def test_nothing_fits() -> None:
    assert largest_fitting(lambda n: False, 1_000, tolerance=0.02) == (0, 1)
