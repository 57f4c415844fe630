"""Layer-wise learning-rate decay (optim.layer_decay): the trunk's layers, as timm groups them, train at
lr x decay^(depth from the top), under every ZeRO stage, and a resume (also at another world size) keeps the
groups and their rates. Checked on the first AdamW step, whose update is +-lr per element (m / sqrt(v) = +-1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.backbone import build_backbone
from model.config import ModelConfig
from train.config import OptimConfig, ZeroConfig
from train.engine import param_groups

VIT = ModelConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=8)
LR, DECAY = 1e-2, 0.5


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(VIT)


def expected_scales(model: nn.Module) -> dict[str, float]:
    """Each parameter's lr scale from timm's own grouping of the trunk; the neck trains at the full rate."""
    from timm.optim import param_groups_layer_decay

    names = {id(p): n for n, p in model.named_parameters()}
    scales = {names[id(p)]: 1.0 for p in model.neck.parameters()}
    for group in param_groups_layer_decay(model.trunk, 0.0, layer_decay=DECAY):
        scales.update({names[id(p)]: group["lr_scale"] for p in group["params"]})
    return scales


def test_groups_follow_timms_layers_and_keep_the_weight_decay_split() -> None:
    model = tiny_vit()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05, layer_decay=DECAY, lr=LR)
    listed = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(names.values())  # every parameter once
    scales = expected_scales(model)
    # the stem (patch embedding, tokens) and 12 blocks; timm puts the last block and the final norm in one layer
    assert sorted(set(scales.values())) == [DECAY**k for k in range(12, -1, -1)]
    for group in groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(LR * scales[names[id(p)]]), names[id(p)]
    assert groups[0]["lr"] == LR  # what the engine reports as train/lr
    plain = param_groups(model, 0.05)  # the same decay / no-decay split as without layer decay
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert no_decay == {names[id(p)] for p in plain[1]["params"]} and "trunk.pos_embed" in no_decay
    with pytest.raises(ValueError, match="optim.layer_decay needs the embedding model's trunk"):
        param_groups(nn.Sequential(nn.Linear(2, 2)), 0.05, layer_decay=DECAY)


def _first_step_rates(stage: int, bf16: bool) -> dict[str, float]:
    """Median |update| / lr of each parameter's fp32 master weights after one engine step (weight decay off)."""
    import deepspeed.utils

    from train.engine import build_engine

    optim = OptimConfig(lr=LR, warmup_steps=0, weight_decay=0.0, layer_decay=DECAY)
    engine = build_engine(tiny_vit(), optim, ZeroConfig(stage=stage, bf16=bf16), micro_batch=2, max_steps=10)

    def masters() -> dict[str, torch.Tensor]:
        return {
            n: (deepspeed.utils.safe_get_full_fp32_param(p) if stage else p).detach().float().clone()
            for n, p in engine.module.named_parameters()
        }

    before = masters()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    engine.backward(engine(x.to(torch.bfloat16 if bf16 else torch.float32)).float().pow(2).mean())
    engine.step()
    return {n: float(((after - before[n]).abs() / LR).median()) for n, after in masters().items()}


@pytest.mark.parametrize("stage, bf16", [(0, False), (1, False), (2, False), (3, False), (2, True)])
def test_each_layer_trains_at_its_rate_under_zero(dist_pool, stage: int, bf16: bool) -> None:
    scales = expected_scales(tiny_vit())
    for rates in dist_pool(2).run(_first_step_rates, stage, bf16):
        for name, rate in rates.items():
            assert rate == pytest.approx(scales[name], rel=0.02), (name, rate, scales[name])


def _train(overrides: list[str], stop_at_step: int | None) -> dict:
    from launch.__main__ import build_config
    from train.main import run

    return run(build_config("mnist_distarc", overrides), stop_at_step=stop_at_step).to_json()


def _resumed_rates(overrides: list[str]) -> dict:
    """The backbone optimizer's groups (rates, sizes) once the run's latest checkpoint is loaded here."""
    from launch.__main__ import build_config
    from train.checkpoint import find_latest
    from train.dist import env_from_environ
    from train.main import build_model

    cfg = build_config("mnist_distarc", overrides)
    trainer, state = build_model(cfg, env_from_environ(), torch.device("cpu"), find_latest(cfg.run_dir))
    groups = trainer.engine.optimizer.param_groups
    return {"step": state.step, "lrs": [g["lr"] for g in groups], "sizes": [len(g["params"]) for g in groups]}


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-3's universal load copies group 0's settings into every group
def test_a_resume_keeps_the_layer_groups_and_rates_at_another_world_size(
    dist_pool, mnist_root: str, tmp_path, stage: int
) -> None:
    from tests.test_train import small_overrides

    args = small_overrides(mnist_root, str(tmp_path), "ld", 14)
    args += ["data.num_workers=0", f"optim.layer_decay={DECAY}", f"zero.stage={stage}"]
    dist_pool(2).run(_train, args, 10)  # 2 ranks, stopped after the step-10 save
    same = dist_pool(2).run(_resumed_rates, args)[0]
    # at 1 rank (through the universal checkpoint), and with layer decay switched off in the config: the
    # checkpoint's groups and rates come back, and the run says so
    other = dist_pool(1).run(_resumed_rates, [*args, "optim.layer_decay=1"])[0]
    assert same["step"] == other["step"] == 10
    assert other["lrs"] == same["lrs"] and other["sizes"] == same["sizes"]
    distinct = sorted(set(same["lrs"]), reverse=True)
    assert len(distinct) == 5  # test_resnet: the stem and 4 stages (the last with the neck)
    assert all(low / high == pytest.approx(DECAY) for high, low in zip(distinct, distinct[1:]))
    assert same["lrs"][0] == distinct[0]
