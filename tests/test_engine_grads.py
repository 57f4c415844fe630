"""Backbone gradients under DeepSpeed ZeRO equal the dense single-process gradient.

ZeRO averages the backbone's gradients over ranks; the head's all-gather backward multiplies by
the world size to make up for it, and the head shards must never be averaged. Checked for world
sizes 1, 2 and 4 and with gradient accumulation 2 (the objective is then the mean of the two
micro-batches' global losses), also with the chunked class softmax (its backward runs inside the engine's).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from model.chest import chest_loss, sample_triplets
from model.config import ChestConfig, LossConfig
from model.distarc import distarc_loss, sphere_radii
from model.task import MetricLearningTask, build_head
from tests.numerics import assert_rel
from train.config import OptimConfig, ZeroConfig

GLOBAL_BATCH, IN_DIM, DIM, CLASSES = 8, 5, 6, 7
CFG = LossConfig(
    name="distarc",
    form="paper",
    scale=2.0,
    margin=0.4,
    radial_weight=0.02,
    phi_weight=1.0,
    radius_start=2.0,
    radius_gap=1.0,
    num_spheres=3,
)
CHEST = LossConfig(
    name="chest",
    init_seed=3,
    chest=ChestConfig(proxies_per_class=2, hyp_dim=4, delta_h=0.5, delta_e=1.0, permute_classes=False),
)
HEADS = {"distarc": CFG, "chest": CHEST}


def make_backbone() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(IN_DIM, 12), nn.Tanh(), nn.Linear(12, DIM))


def micro_batches(accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(GLOBAL_BATCH, IN_DIM, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g))
        for _ in range(accum)
    ]


def engine_rank(stage: int, accum: int, head_name: str, class_chunk: int = 0) -> dict:
    import deepspeed.utils
    import torch.distributed as dist

    from train.engine import build_engine
    from train.step import reduce_head_grads

    rank, world = dist.get_rank(), dist.get_world_size()
    b = GLOBAL_BATCH // world
    engine = build_engine(
        make_backbone(),
        OptimConfig(grad_accum_steps=accum, warmup_steps=0),
        ZeroConfig(stage=stage),
        micro_batch=b,
        max_steps=10,
    )
    cfg = dataclasses.replace(HEADS[head_name], class_chunk=class_chunk)
    head = build_head(cfg, CLASSES, DIM, rank, world, embedding_grad_scale=float(world))
    task = MetricLearningTask(engine, head)
    for i, (images, labels) in enumerate(micro_batches(accum)):
        out = task(images[rank * b : (rank + 1) * b], labels[rank * b : (rank + 1) * b])
        engine.backward(out["loss"])
        if i < accum - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    assert engine.is_gradient_accumulation_boundary()
    reduce_head_grads(head)  # what train_step does at the boundary: sum the replicated FC's grads
    grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    return {
        "backbone": grads,
        "shard": next(iter(head.sharded_parameters().values())).grad.clone(),
        "replicated": {k: p.grad.clone() for k, p in head.replicated_parameters().items()},
    }


def dense(accum: int, head_name: str, world: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    model = make_backbone()
    head = build_head(HEADS[head_name], CLASSES, DIM)  # one rank holds the whole table
    losses = []
    for x, y in micro_batches(accum):
        if head_name == "distarc":
            radii = sphere_radii(torch.arange(CLASSES), CFG.radius_start, CFG.radius_gap, CFG.num_spheres)
            losses.append(distarc_loss(model(x), y, head.weight, radii, CFG))
        else:
            trip = sample_triplets(CLASSES, 2, world, CHEST.init_seed, 0, "peer")
            losses.append(chest_loss(model(x), y, head.proxies, CHEST, head.fc, trip))
    (sum(losses) / accum).backward()
    shard = next(iter(head.sharded_parameters().values())).grad
    return (
        {n: p.grad for n, p in model.named_parameters()},
        shard,
        {k: p.grad for k, p in head.replicated_parameters().items()},
    )


@pytest.mark.parametrize("world", [1, 2, 4])
def test_backbone_and_head_grads_match_dense(dist_pool, world: int) -> None:
    pool = dist_pool(world)
    cases = [("distarc", 2, 1, 0), ("distarc", 2, 2, 0), ("distarc", 1, 2, 0), ("chest", 2, 2, 0)]
    cases += [("distarc", 2, 2, 1), ("chest", 2, 2, 1)]  # the softmax one class at a time (loss.class_chunk)
    for head_name, stage, accum, chunk in cases:
        results = pool.run(engine_rank, stage, accum, head_name, chunk)
        ref_backbone, ref_shard, ref_repl = dense(accum, head_name, world)
        msg = f"{head_name} ZeRO-{stage} accum {accum} class_chunk {chunk}"
        for r in results:
            for name, ref in ref_backbone.items():
                assert_rel(r["backbone"][name], ref, f"{msg} backbone {name}")
            for name, ref in ref_repl.items():  # summed over ranks: the same full gradient everywhere
                assert_rel(r["replicated"][name], ref, f"{msg} {name}")
        assert_rel(torch.cat([r["shard"] for r in results]), ref_shard, f"{msg} head shard")


def test_head_optimizer_gives_chest_fc_its_own_learning_rate() -> None:
    """Proxies at optim.head_lr without decay; CHEST's shared FC h at optim.fc_lr (0 = the backbone's lr),
    with the backbone's weight decay on its matrix only; the schedule scales every group alike."""
    from train.engine import build_head_optimizer

    head = build_head(CHEST, CLASSES, DIM)
    optim = OptimConfig(lr=1e-4, head_lr=1e-2, weight_decay=0.05, warmup_steps=2)
    opt, sched = build_head_optimizer(head, optim, max_steps=10)
    groups = [(g["lr"], g["weight_decay"], [p.shape for p in g["params"]]) for g in opt.param_groups]
    assert [g[1] for g in groups] == [0.0, 0.05, 0.0]
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-2, 1e-4, 1e-4]
    assert groups[1][2] == [head.fc.weight.shape] and groups[2][2] == [head.fc.bias.shape]
    assert [g[0] for g in groups] == pytest.approx([5e-3, 5e-5, 5e-5])  # warm-up step 1 of 2
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 1e-4, 1e-4])
    opt, _ = build_head_optimizer(head, OptimConfig(lr=1e-4, head_lr=1e-2, fc_lr=3e-3), max_steps=10)
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-2, 3e-3, 3e-3]
    distarc_opt, _ = build_head_optimizer(build_head(CFG, CLASSES, DIM), optim, max_steps=10)
    assert len(distarc_opt.param_groups) == 1  # no replicated parameters


def bf16_batchnorm_rank() -> dict:
    """A bf16 ZeRO-2 engine over a conv + BatchNorm backbone: one step and its buffers' dtypes."""
    from train.engine import build_engine

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    engine = build_engine(net, OptimConfig(warmup_steps=0), ZeroConfig(stage=2, bf16=True), micro_batch=2, max_steps=2)
    loss = engine(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)).float().square().mean()
    engine.backward(loss)
    engine.step()
    return {"loss": float(loss), "buffers": {n: b.dtype for n, b in engine.module.named_buffers()}}


def test_bf16_engine_runs_batchnorm_backbones(dist_pool) -> None:
    """DeepSpeed >= 0.19 keeps buffers fp32 under bf16 unless told; BatchNorm then fails ("expected
    scalar type BFloat16 but found Float", first seen on an H200): train/engine.py casts them."""
    (result,) = dist_pool(1).run(bf16_batchnorm_rank)
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert result["buffers"]["1.running_mean"] == result["buffers"]["1.running_var"] == torch.bfloat16


def clipping_rank(grad_clip: float) -> dict:
    """The clipping norm a real engine applies in its step, and the gradient norm (far above 1) of a
    linear backbone's loss."""
    from train.engine import build_engine

    torch.manual_seed(0)
    net = nn.Linear(8, 4)
    engine = build_engine(net, OptimConfig(warmup_steps=0, grad_clip=grad_clip), ZeroConfig(stage=0), 2, 2)
    loss = 100.0 * engine(torch.ones(2, 8)).sum()
    engine.backward(loss)
    norm = torch.sqrt(sum(p.grad.float().square().sum() for p in net.parameters()))  # ZeRO-0: grads in place
    return {"clip": engine.gradient_clipping(), "grad_norm": float(norm)}


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_grad_clip_zero_means_off(dist_pool, grad_clip: float) -> None:
    """DeepSpeed's gradient_clipping defaults to 1.0 when the key is absent: optim.grad_clip=0 must write
    0, not leave it out (it did, and every "unclipped" recipe was clipped at global norm 1)."""
    (result,) = dist_pool(1).run(clipping_rank, grad_clip)
    assert result["clip"] == grad_clip and result["grad_norm"] > 100  # clipping at 1 would have mattered


def test_vit_position_embedding_and_class_token_get_no_weight_decay() -> None:
    """timm's no_weight_decay() names (pos_embed, cls_token) join biases and norm weights in the group
    without decay, as timm's param_groups_weight_decay puts them."""
    from timm.optim import param_groups_weight_decay

    from model.backbone import build_backbone
    from model.config import ModelConfig
    from train.engine import param_groups

    model = build_backbone(ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16))
    ours = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in ours[1]["params"]}
    assert {"trunk.pos_embed", "trunk.cls_token"} <= no_decay
    skip = [f"trunk.{n}" for n in model.trunk.no_weight_decay()]
    theirs = param_groups_weight_decay(model, 0.05, no_weight_decay_list=skip)
    assert no_decay == {names[id(p)] for g in theirs if g["weight_decay"] == 0.0 for p in g["params"]}
    assert ours[0]["weight_decay"] == 0.05 and ours[1]["weight_decay"] == 0.0
    legacy = param_groups(model, 0.05, "ndim")  # checkpoints from before: 1-D tensors only
    assert "trunk.pos_embed" in {names[id(p)] for p in legacy[0]["params"]}

    class Patterned(nn.Module):  # timm matches no_weight_decay() entries with fnmatch (XCiT: 'pos_embed.*')
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed, self.proj = nn.Linear(2, 2), nn.Linear(2, 2)

        def no_weight_decay(self) -> set[str]:
            return {"pos_embed.*"}

    groups = param_groups(nn.Sequential(Patterned()), 0.05)
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([2, 2])]  # proj.weight only
