"""The training loop, on one screen: batch -> step -> log -> checkpoint -> eval -> stop."""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from train.checkpoint import TrainState
from train.config import RunConfig
from train.control import RunControl
from train.metrics import MetricLogger
from train.step import Trainer, train_step
from train.system import StepClock, progress_enabled


def train_loop(cfg: RunConfig, tr: Trainer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               state: TrainState, logger: MetricLogger, global_batch: int, is_main: bool,
               save: Callable[[TrainState], str], evaluate: Callable[[int], dict[str, float]],
               stop_step: int, control: RunControl) -> TrainState:
    """Train from `state.step` to `stop_step` (<= cfg.max_steps) or a stop signal; returns the counters.

    `save`, `evaluate` and `control.poll` are collective: every rank reaches them at the same step.
    A signal (any rank) makes every rank save at once and stop; `state.stop_signal` tells the caller.
    """
    clock = StepClock(global_batch, tr.world_size, cfg.max_steps, tr.device)
    timed_batches = clock.timed(batches)
    logger.reset_timer(state.step)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not progress_enabled(is_main), mininterval=5.0,
               desc="train")
    while state.step < min(stop_step, cfg.max_steps):
        scalars = train_step(tr, timed_batches, state.step, cfg.optim.grad_accum_steps)
        state.skipped_in_a_row = int(scalars.pop("skipped")) * (state.skipped_in_a_row + 1)
        state.skipped_steps += state.skipped_in_a_row > 0
        if state.skipped_in_a_row > cfg.optim.max_skipped_steps:
            raise FloatingPointError(
                f"{state.skipped_in_a_row} steps in a row up to step {state.step} had a non-finite loss or gradient "
                f"(last: {scalars}); nothing was updated. Lower optim.lr / optim.head_lr, raise optim.warmup_steps, "
                f"set optim.grad_clip, or resume from an earlier checkpoint; optim.max_skipped_steps="
                f"{cfg.optim.max_skipped_steps} sets how many are tolerated")
        state.step += 1
        state.samples_seen += global_batch
        state.first_step_at = state.first_step_at or time.time()
        bar.update(1)
        if state.step % cfg.metrics.log_every == 0 or state.step == cfg.max_steps:
            scalars["bad_samples"] = float(getattr(batches, "bad_samples", 0))  # skipped so far, all ranks
            scalars["skipped_steps"] = float(state.skipped_steps)  # the same on every rank
            state.last_loss = logger.log(state.step, state.samples_seen, scalars)["loss"]
            logger.log(state.step, state.samples_seen, clock.window(state.step), prefix="system")
        decision = control.poll()
        if (decision.save or decision.stop_signal or state.step % cfg.checkpoint.every_steps == 0
                or state.step in (cfg.max_steps, stop_step)):
            save(state)
            control.saved()
            logger.reset_timer(state.step)
            clock.reset(state.step)
        if decision.stop_signal:
            state.stop_signal = decision.stop_signal
            break
        if cfg.metrics.eval_every and state.step % cfg.metrics.eval_every == 0 and state.step < cfg.max_steps:
            logger.log(state.step, state.samples_seen, evaluate(state.step), prefix="eval")
            logger.reset_timer(state.step)
            clock.reset(state.step)
    bar.close()
    return state
