"""Running statistics of normalisation layers (BatchNorm) made rank 0's on every rank before evaluation
(train.dist.broadcast_running_stats_, DDP's semantics): DeepSpeed syncs parameters only, so each rank's
statistics follow its own data. Checked in 2 and 4 gloo processes against rank 0's own values."""

from __future__ import annotations

import pytest
import torch


def _bn_on_rank_data(dtype: torch.dtype) -> dict:
    import torch.distributed as dist

    from train.dist import broadcast_running_stats_

    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    net.register_buffer("scale_table", torch.arange(4.0))  # not a running statistic: left alone
    net.train()
    for _ in range(3):  # each rank its own data: the statistics drift apart
        net(torch.randn(8, 3, 6, 6) * (1 + rank) + rank)
    net.to(dtype)
    own = {k: v.clone() for k, v in net.named_buffers()}
    count = broadcast_running_stats_(net)
    return {"count": count, "own": own, "after": dict(net.named_buffers())}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_running_stats_become_rank_0_s(dist_pool, world: int, dtype: torch.dtype) -> None:
    results = dist_pool(world).run(_bn_on_rank_data, dtype)
    assert all(r["count"] == 2 for r in results)  # BatchNorm's running_mean and running_var
    for name in ("1.running_mean", "1.running_var"):
        own = torch.stack([r["own"][name].float() for r in results])
        assert (own[0] != own[1]).all(), name  # they had drifted apart
        for r in results:
            assert r["after"][name].dtype == dtype
            assert torch.equal(r["after"][name], results[0]["own"][name]), name
    for name in ("1.num_batches_tracked", "scale_table"):
        for r in results:
            assert torch.equal(r["after"][name], r["own"][name]), name


def test_one_process_changes_nothing() -> None:
    from train.dist import broadcast_running_stats_

    bn = torch.nn.BatchNorm1d(3)
    bn(torch.randn(5, 3))
    before = bn.running_mean.clone()
    assert broadcast_running_stats_(bn) == 2 and torch.equal(bn.running_mean, before)
