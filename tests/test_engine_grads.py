"""Backbone gradients under DeepSpeed ZeRO equal the dense single-process gradient.

ZeRO averages the backbone's gradients over ranks; the head's all-gather backward multiplies by
the world size to make up for it, and the head shards must never be averaged. Checked for world
sizes 1, 2 and 4 and with gradient accumulation 2 (the objective is then the mean of the two
micro-batches' global losses).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import LossConfig
from model.distarc import DistArcHead, distarc_loss, sphere_radii
from model.task import MetricLearningTask
from train.config import OptimConfig, ZeroConfig

GLOBAL_BATCH, IN_DIM, DIM, CLASSES = 8, 5, 6, 7
CFG = LossConfig(name="distarc", form="paper", scale=2.0, margin=0.4, radial_weight=0.02, phi_weight=1.0,
                 radius_start=2.0, radius_gap=1.0, num_spheres=3)


def make_backbone() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(IN_DIM, 12), nn.Tanh(), nn.Linear(12, DIM))


def micro_batches(accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(GLOBAL_BATCH, IN_DIM, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g))
            for _ in range(accum)]


def engine_rank(stage: int, accum: int) -> dict:
    import deepspeed.utils
    import torch.distributed as dist

    from train.engine import build_engine

    rank, world = dist.get_rank(), dist.get_world_size()
    b = GLOBAL_BATCH // world
    engine = build_engine(make_backbone(), OptimConfig(grad_accum_steps=accum, warmup_steps=0),
                          ZeroConfig(stage=stage), micro_batch=b, max_steps=10)
    head = DistArcHead(CFG, CLASSES, DIM, rank, world, embedding_grad_scale=float(world))
    task = MetricLearningTask(engine, head)
    for i, (images, labels) in enumerate(micro_batches(accum)):
        out = task(images[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b])
        engine.backward(out["loss"])
        if i < accum - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    assert engine.is_gradient_accumulation_boundary()
    grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    return {"backbone": grads, "head": head.weight.grad.clone()}


def dense(accum: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model = make_backbone()
    head = DistArcHead(CFG, CLASSES, DIM)  # one rank holds the whole table
    radii = sphere_radii(torch.arange(CLASSES), CFG.radius_start, CFG.radius_gap, CFG.num_spheres)
    total = sum(distarc_loss(model(x), y, head.weight, radii, CFG) for x, y in micro_batches(accum)) / accum
    total.backward()
    return {n: p.grad for n, p in model.named_parameters()}, head.weight.grad


@pytest.mark.parametrize("world", [1, 2, 4])
def test_backbone_and_head_grads_match_dense(dist_pool, world: int) -> None:
    pool = dist_pool(world)
    for stage, accum in ((2, 1), (2, 2), (1, 2)):
        results = pool.run(engine_rank, stage, accum)
        ref_backbone, ref_head = dense(accum)
        for r in results:
            for name, ref in ref_backbone.items():
                torch.testing.assert_close(r["backbone"][name], ref, rtol=1e-5, atol=1e-7,
                                           msg=f"ZeRO-{stage} accum {accum} backbone {name}")
        head_grad = torch.cat([r["head"] for r in results])
        torch.testing.assert_close(head_grad, ref_head, rtol=1e-5, atol=1e-7, msg=f"ZeRO-{stage} accum {accum} head")
