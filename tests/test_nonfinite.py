"""A step with a non-finite loss or gradient updates nothing, on every rank, and is counted; too many in a
row stop the run with an error naming the fixes.

Two injections on one rank only: a NaN loss *value* whose gradients stay finite (only our collective flag
can catch it), and NaN input pixels (NaN backbone gradients: DeepSpeed's own check at ZeRO >= 1, the
guarded optimizer's at stage 0). The reference is the state before the step: nothing may move, while every
lr schedule still advances by one.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from torch import nn

from model.config import LossConfig
from model.task import MetricLearningTask, build_head
from train.config import OptimConfig, ZeroConfig
from train.schedule import lr_factor

BATCH, IN_DIM, DIM, CLASSES, STEPS, BAD_STEP = 4, 5, 6, 7, 4, 2
LOSS = LossConfig(name="distarc", scale=2.0, margin=0.2, radius_start=2.0, radius_gap=1.0, num_spheres=2)


class Identity:
    """InputNormaliser stand-in for float features: cast and move only."""

    def __call__(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return images.to(device, dtype)


class NanLossValue(MetricLearningTask):
    """At BAD_STEP the loss value is NaN while its backward stays finite (d loss / d loss = 1)."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        out = super().forward(images, labels, step=step)
        if step == BAD_STEP:
            out["loss"] = out["loss"] + torch.tensor(float("nan"))
        return out

    __call__ = forward


def snapshot(engine, head) -> dict[str, torch.Tensor]:
    import deepspeed.utils

    # the fp32 master weights under ZeRO (None at stage 0, where the parameters are the fp32 weights)
    out = {
        f"backbone.{n}": (deepspeed.utils.safe_get_full_fp32_param(p) if engine.zero_optimization() else p)
        .detach()
        .clone()
        for n, p in engine.module.named_parameters()
    }
    # BatchNorm statistics: a forward updates them, so a skipped step must put them back
    out.update({f"running.{n}": b.detach().clone() for n, b in engine.module.named_buffers()})
    out.update({f"head.{n}": p.detach().clone() for n, p in head.named_parameters()})
    return out


def skip_rank(stage: int, injection: str, bad_rank: int, head_optimizer: str = "adamw", trunk: str = "mlp") -> dict:
    """STEPS steps through train_step; at BAD_STEP rank `bad_rank` injects `injection`. A lazy head optimizer
    trains a Partial-FC head (sample rate 0.5): its gradients are row-sparse. trunk="vit": a 2-block timm ViT,
    whose blocks ZeRO-3 fetches as leaf modules (zero.stage3_leaf_blocks)."""
    import torch.distributed as dist

    from train.engine import build_engine, build_head_optimizer
    from train.step import TrainableModel, train_step

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(7)
    backbone, dim, shape = (
        nn.Sequential(nn.Linear(IN_DIM, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, DIM)),
        DIM,
        (IN_DIM,),
    )
    if trunk == "vit":
        import timm

        backbone = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=8, depth=2
        )
        dim, shape = backbone.num_features, (3, 16, 16)
    optim = OptimConfig(warmup_steps=0, lr=0.05, head_lr=0.05, head_optimizer=head_optimizer)
    engine = build_engine(backbone, optim, ZeroConfig(stage=stage), micro_batch=BATCH, max_steps=10)
    loss = dataclasses.replace(LOSS, sample_rate=0.5) if head_optimizer.startswith("lazy_") else LOSS
    head = build_head(loss, CLASSES, dim, rank, world, embedding_grad_scale=float(world))
    head_opt, head_sched = build_head_optimizer(head, optim, 10)
    task = (NanLossValue if injection == "nan_loss_value" and rank == bad_rank else MetricLearningTask)(engine, head)
    tr = TrainableModel(engine, task, head_opt, head_sched, torch.device("cpu"), torch.float32, Identity())  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(100 + rank)
    history, skipped, lrs, norms = [], [], [], []
    for step in range(STEPS):
        images, labels = torch.randn(BATCH, *shape, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
        if injection == "nan_pixels" and step == BAD_STEP and rank == bad_rank:
            images[0].view(-1)[0] = float("nan")
        history.append(snapshot(engine, head))
        one_step = types.SimpleNamespace(optim=types.SimpleNamespace(grad_accum_steps=1))
        scalars = train_step(
            types.SimpleNamespace(
                model=tr, batches=iter([(images, labels)]), cfg=one_step, state=types.SimpleNamespace(step=step)
            )
        )
        skipped.append(scalars["skipped"])
        lrs.append((scalars["lr"], scalars["head_lr"], head_sched.last_epoch, engine.lr_scheduler.last_epoch))
        norms.append(scalars.get("grad_norm"))
    history.append(snapshot(engine, head))
    adam_steps = sorted({float(s["step"]) for s in engine.client_optimizer.state.values() if "step" in s})
    return {"history": history, "skipped": skipped, "lrs": lrs, "adam_steps": adam_steps, "norms": norms}


@pytest.mark.parametrize("world", [1, 2])
def test_a_non_finite_step_updates_nothing_on_any_rank(dist_pool, world: int) -> None:
    pool = dist_pool(world)
    for stage, injection, head_optimizer, trunk in (
        (2, "nan_loss_value", "adamw", "mlp"),
        (2, "nan_pixels", "adamw", "mlp"),
        (0, "nan_pixels", "adamw", "mlp"),
        (3, "nan_loss_value", "adamw", "mlp"),
        (0, "nan_loss_value", "adamw", "mlp"),
        (2, "nan_pixels", "lazy_adamw", "mlp"),  # NaN in the sampled rows' sparse gradient
        (3, "nan_pixels", "adamw", "vit"),  # NaN gradients inside ZeRO-3 leaf blocks
    ):
        results = pool.run(skip_rank, stage, injection, world - 1, head_optimizer, trunk)
        msg = f"ZeRO-{stage} {injection} world {world} {head_optimizer} {trunk}"
        for r in results:
            assert r["skipped"] == [float(s == BAD_STEP) for s in range(STEPS)], msg
            before, after = r["history"][BAD_STEP], r["history"][BAD_STEP + 1]
            for name, value in before.items():
                assert torch.equal(value, after[name]), f"{msg}: {name} moved on the skipped step"
                assert torch.isfinite(r["history"][-1][name]).all(), f"{msg}: {name} is not finite at the end"
            for step in (BAD_STEP - 1, BAD_STEP + 1):  # the neighbours do update, the backbone included
                changed = [n for n in before if not torch.equal(r["history"][step][n], r["history"][step + 1][n])]
                assert any(n.startswith("backbone.") for n in changed), f"{msg}: step {step} updated nothing"
            # every schedule advanced once per step, the skipped one included, and they agree
            assert [lr[2:] for lr in r["lrs"]] == [(s + 1, s + 1) for s in range(STEPS)], msg
            assert all(lr[0] == pytest.approx(lr[1]) for lr in r["lrs"]), msg
            # the logged rate is the one the step trained with (it read one step ahead before)
            expected = [0.05 * lr_factor(s, 0, 10, OptimConfig().min_lr_ratio) for s in range(STEPS)]
            assert [lr[0] for lr in r["lrs"]] == pytest.approx(expected), msg
            assert r["adam_steps"] == [float(STEPS - 1)], f"{msg}: AdamW counted the skipped step"
            assert all(n is not None for n in r["norms"]), f"{msg}: no train/grad_norm"  # ZeRO-0 had none
        for name in results[0]["history"][-1]:
            if name.startswith("backbone."):  # the backbone stays replicated
                assert all(torch.equal(results[0]["history"][-1][name], r["history"][-1][name]) for r in results)


def test_too_many_skipped_steps_in_a_row_stop_the_run(monkeypatch) -> None:
    """The loop counts skipped steps (train/skipped_steps), resets the streak on a good step, and raises
    after optim.max_skipped_steps in a row."""
    from train import loop
    from train.checkpoint import TrainState
    from train.control import Decision
    from train.system import StepClock

    pattern = iter([1, 0, 1, 1, 0, 1, 1, 1, 1])  # streaks of 1, 2 and then 4

    def fake_step(run) -> dict[str, float]:
        return {"loss": float("nan"), "skipped": float(next(pattern))}

    logged: list[dict[str, float]] = []
    logger = types.SimpleNamespace(
        log=lambda step, seen, scalars, prefix="train": logged.append({"prefix": prefix, **scalars}) or dict(scalars),
    )
    control = types.SimpleNamespace(poll=lambda: Decision(save=False, stop_signal=0), saved=lambda: None)
    cfg = types.SimpleNamespace(
        max_steps=100,
        optim=OptimConfig(max_skipped_steps=3),
        metrics=types.SimpleNamespace(log_every=1, eval_every=0),
        checkpoint=types.SimpleNamespace(every_steps=1000),
    )
    state = TrainState()
    run = types.SimpleNamespace(
        cfg=cfg,
        state=state,
        logger=logger,
        control=control,
        global_batch=8,
        clock=StepClock(8, 1, 100, torch.device("cpu")),
        env=types.SimpleNamespace(is_main=False),
        stream=types.SimpleNamespace(bad_samples=0),
        save=lambda: "",
        evaluate=lambda: {},
    )
    monkeypatch.setattr(loop, "train_step", fake_step)
    # a lower lr needs a new run: a resume keeps the checkpoint's rates (the advice to resume with one misled)
    advice = r"lower optim.lr / optim.head_lr in a new run .* a resume keeps its checkpoint's learning rates"
    with pytest.raises(FloatingPointError, match=rf"4 steps in a row, steps 6-9, had .*{advice}.*max_skipped_steps=3"):
        loop.train_loop(run, 100)
    train_rows = [row for row in logged if row["prefix"] == "train"]
    # the failing step 9 is logged too (with log_every=100 the streak would not show otherwise)
    assert [row["skipped_steps"] for row in train_rows] == [1, 1, 2, 3, 3, 4, 5, 6, 7]
    assert all(row["img_per_s"] > 0 for row in train_rows[:-1])  # from the step clock's window
    assert state.skipped_steps == 7 and state.step == 8
    system = [row for row in logged if row["prefix"] == "system"]
    assert len(system) == 8 and all(row["peak_mem_gb"] > 0 for row in system)
    assert all(0.0 <= row["data_wait_frac"] <= 1.0 for row in system[1:])
