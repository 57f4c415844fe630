"""One optimizer step: grad_accum_steps micro-batches through the task, then both optimizers."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch

from data.transforms import InputNormaliser
from model.proxies import ShardedHead
from model.task import MetricLearningTask
from train.dist import global_norm, max_over_ranks, sum_over_ranks_
from train.engine import GuardedAdamW
from train.lazy_rows import coalesced

if TYPE_CHECKING:
    from train.main import Run


@dataclasses.dataclass
class TrainableModel:
    """The model and its optimizers: the DeepSpeed engine (backbone, with its AdamW and schedule), the task
    (backbone + class-sharded head), the head's optimizer and schedule, and how a loader's images become
    the backbone's input."""

    engine: Any
    task: MetricLearningTask
    head_optimizer: torch.optim.Optimizer
    head_scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    input_dtype: torch.dtype
    normaliser: InputNormaliser

    @property
    def backbone_optimizer(self) -> GuardedAdamW:
        """The client optimizer inside the engine (train/engine.py), which skips non-finite steps."""
        return self.engine.client_optimizer

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Loader images (uint8 pixels or normalised float) -> normalised, on the device, in input_dtype."""
        return self.normaliser(images, self.device, self.input_dtype)


def train_step(run: "Run") -> dict[str, float]:
    """Run `grad_accum_steps` micro-batches of `run.batches` and one update of `run.model`; return the
    step's scalars (this rank's view).

    engine.backward divides the loss by accum_steps, so the head's gradients are scaled alike. At the
    boundary the engine averages the backbone's gradients over ranks (the all-gather's backward has
    multiplied them by the world size), the head's replicated parameters are summed over ranks, and
    its class shards are never reduced.

    A step whose loss or gradients are not finite on some rank updates nothing (scalar `skipped` = 1):
    the decision is collective (one all-reduce), the backbone's optimizer is told to skip, DeepSpeed
    skips by itself on non-finite backbone gradients, and either way the head is not updated. Every
    schedule still advances, so a skipped step is a step without an update and resume stays exact.
    (Reads run.model, run.batches, run.state.step and run.cfg.optim.grad_accum_steps only: tests and the
    benchmark pass lighter objects.)
    """
    tr, batches, step, accum_steps = run.model, run.batches, run.state.step, run.cfg.optim.grad_accum_steps
    sums: dict[str, float] = {}
    parts: dict[str, torch.Tensor] = {}  # kept on the device: one host sync per step, not per micro-batch
    guard = tr.backbone_optimizer
    # the rates this step trains with (the schedules advance below): what train/lr and train/head_lr show
    sums["lr"], sums["head_lr"] = float(tr.engine.get_lr()[0]), float(tr.head_scheduler.get_last_lr()[0])
    stats = running_stats(tr.engine.module)
    before = [t.clone() for t in stats]  # forward passes update BatchNorm statistics, a skipped step may not
    # a checkpointed block's backward re-runs its forward in training mode, and BatchNorm would count the
    # micro-batch twice (momentum ~0.19, not 0.1): there the backward may not change the statistics
    recomputed = stats if recomputes_forward(tr.engine.module) else []
    for _ in range(accum_steps):
        images, labels = next(batches)
        labels = labels.to(tr.device, non_blocking=True)
        out = tr.task(tr.model_input(images), labels, step=step)
        after_forward = [t.clone() for t in recomputed]
        tr.engine.backward(out["loss"])
        restore_(recomputed, after_forward)
        for key, value in out.items():
            parts[key] = parts.get(key, 0.0) + value.detach().float() / accum_steps
        if tr.engine.is_gradient_accumulation_boundary():
            sums["head_grad_norm"] = reduce_head_grads(tr.task.head)  # global: the same on every rank
            if tr.engine.zero_optimization_stage() == 0:  # DeepSpeed reports no norm there (before clipping)
                sums["grad_norm"] = trunk_grad_norm(tr.engine.module)
            local_bad = not (math.isfinite(sums["head_grad_norm"]) and bool(torch.isfinite(parts["loss"])))
            guard.skip, guard.skipped = max_over_ranks(float(local_bad)) > 0, False
        tr.engine.step()  # called every micro-batch; DeepSpeed only updates at the boundary
    keys = sorted(parts)
    sums.update(zip(keys, torch.stack([parts[k] for k in keys]).tolist()))
    skipped = guard.skipped or not tr.engine.was_step_applied()
    if not tr.engine.was_step_applied():
        tr.engine.lr_scheduler.step()  # DeepSpeed does not advance the schedule of a step it skipped
    if not skipped:
        tr.head_optimizer.step()
    else:
        restore_(stats, before)
    tr.head_optimizer.zero_grad(set_to_none=True)
    tr.head_scheduler.step()
    grad_norm = tr.engine.get_global_grad_norm()
    if grad_norm is not None:
        sums["grad_norm"] = float(grad_norm)
    sums["skipped"] = float(skipped)
    return sums


def running_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a training-mode forward updates: BatchNorm's running mean / variance / batch count."""
    return [
        buffer
        for sub in module.modules()
        if isinstance(sub, torch.nn.modules.batchnorm._NormBase) and sub.track_running_stats
        for buffer in (sub.running_mean, sub.running_var, sub.num_batches_tracked)
        if buffer is not None
    ]


def recomputes_forward(module: torch.nn.Module) -> bool:
    """Whether activation checkpointing is on somewhere in `module` (timm's set_grad_checkpointing sets
    `grad_checkpointing` on the model, and on stages that checkpoint their own blocks)."""
    return any(getattr(sub, "grad_checkpointing", False) is True for sub in module.modules())


def restore_(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Copy `saved` back into `buffers` (running_stats' list), in place."""
    for now, then in zip(buffers, saved):
        now.copy_(then)


def trunk_grad_norm(module: torch.nn.Module) -> float:
    """Global norm of the trunk's gradients, already averaged over ranks (ZeRO-0 at the boundary)."""
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def reduce_head_grads(head: ShardedHead) -> float:
    """Sum the replicated head parameters' partial gradients over ranks (never the shards' own);
    return the head's global gradient norm."""
    for param in head.sharded_parameters().values():
        if param.grad is not None and param.grad.is_sparse:  # a lazy head optimizer's row-sparse gradient: a
            param.grad = coalesced(param.grad)  # row sampled in two micro-batches is listed twice until summed
    shards = [
        p.grad.values() if p.grad.is_sparse else p.grad
        for p in head.sharded_parameters().values()
        if p.grad is not None
    ]
    replicated = [p.grad for p in head.replicated_parameters().values() if p.grad is not None]
    sum_over_ranks_(replicated)
    return global_norm(shards, replicated)
