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
    # both ends were measured, not assumed: a bracket end never probed would be a guess
    assert (lo == 0 or lo in probed) and hi in probed


def test_nothing_fits() -> None:
    assert largest_fitting(lambda n: False, 1_000, tolerance=0.02) == (0, 1)


@pytest.mark.parametrize("head, sample_rate", [("distarc", 1.0), ("distarc", 0.1), ("chest", 0.1)])
def test_head_steps_build_their_table_without_init_rows(head: str, sample_rate: float, monkeypatch) -> None:
    """The search builds tables of tens of millions of classes: on the device, not through init_rows' CPU
    generators (~3 s per million classes on one core; the GPU run's 80 s did not finish its first row)."""
    import dataclasses

    import torch

    from bench.capacity import train_head_steps
    from bench.heads import HEADS

    def cpu_rows(*args: object) -> None:
        raise AssertionError("init_rows called")

    monkeypatch.setattr("model.distarc.init_rows", cpu_rows)
    monkeypatch.setattr("model.chest.init_rows", cpu_rows)
    cfg = dataclasses.replace(HEADS[head], sample_rate=sample_rate)
    train_head_steps(cfg, 2_000, torch.device("cpu"), "sgd")


def test_heads_bench_refuses_more_ranks_than_gpus(monkeypatch) -> None:
    """bench.heads gives each rank cuda:rank: its default --worlds 1,2,4 on a one-GPU machine failed in
    cuda.set_device (or NCCL) after the first rows; refused before any."""
    import sys

    import torch

    from bench import heads

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(heads, "run_config", lambda *a, **k: pytest.fail("no row may run"))
    monkeypatch.setattr(sys, "argv", ["bench.heads", "--classes", "1000"])
    with pytest.raises(SystemExit, match="--worlds 1,2,4: each rank takes a GPU and this machine has 1"):
        heads.main()
