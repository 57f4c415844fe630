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


def _statistics_after_one_step(grad_checkpointing: bool) -> dict[str, torch.Tensor]:
    """BatchNorm buffers of a timm ResNet after one train_step of two micro-batches (same seed and data)."""
    import types

    from model.backbone import build_backbone
    from model.config import LossConfig, ModelConfig
    from model.task import MetricLearningTask, build_head
    from train.config import OptimConfig, ZeroConfig
    from train.engine import build_engine, build_head_optimizer
    from train.step import TrainableModel, train_step

    torch.manual_seed(0)
    model = build_backbone(ModelConfig(name="resnet18", embed_dim=8, grad_checkpointing=grad_checkpointing))
    optim = OptimConfig(warmup_steps=0, grad_accum_steps=2)
    engine = build_engine(model, optim, ZeroConfig(stage=0), micro_batch=4, max_steps=10)
    head = build_head(LossConfig(name="softmax"), 5, 8, 0, 1)
    head_opt, head_sched = build_head_optimizer(head, optim, 10)
    task = MetricLearningTask(engine, head)
    to_device = lambda images, device, dtype: images.to(device, dtype)  # noqa: E731 - float images as they are
    tr = TrainableModel(engine, task, head_opt, head_sched, torch.device("cpu"), torch.float32, to_device)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    batches = iter([(torch.randn(4, 3, 16, 16, generator=g) * 2 + 1, torch.tensor([0, 1, 2, 3])) for _ in range(2)])
    cfg = types.SimpleNamespace(optim=optim)
    scalars = train_step(types.SimpleNamespace(model=tr, batches=batches, cfg=cfg, state=types.SimpleNamespace(step=0)))
    assert scalars["skipped"] == 0
    return {n: b.clone() for n, b in engine.module.named_buffers()}


def test_checkpointed_blocks_count_each_micro_batch_once(dist_pool) -> None:
    """timm's checkpoint_seq re-runs each ResNet block's forward, in training mode, during the backward: without
    train_step's restore every BatchNorm inside a checkpointed block took each micro-batch twice."""
    plain, checkpointed = (dist_pool(1).run(_statistics_after_one_step, ckpt)[0] for ckpt in (False, True))
    assert plain.keys() == checkpointed.keys() and any(n.endswith("num_batches_tracked") for n in plain)
    for name, value in plain.items():
        if name.endswith("num_batches_tracked"):
            assert int(value) == int(checkpointed[name]) == 2, name  # two micro-batches, once each
        else:
            torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-6, msg=name)
