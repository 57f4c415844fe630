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


def train_loop(cfg: RunConfig, tr: Trainer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               state: TrainState, logger: MetricLogger, global_batch: int, is_main: bool,
               save: Callable[[TrainState], str], evaluate: Callable[[int], dict[str, float]],
               stop_step: int, control: RunControl) -> TrainState:
    """Train from `state.step` to `stop_step` (<= cfg.max_steps) or a stop signal; returns the counters.

    `save`, `evaluate` and `control.poll` are collective: every rank reaches them at the same step.
    A signal (any rank) makes every rank save at once and stop; `state.stop_signal` tells the caller.
    """
    logger.reset_timer(state.step)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not is_main, mininterval=5.0, desc="train")
    while state.step < min(stop_step, cfg.max_steps):
        scalars = train_step(tr, batches, state.step, cfg.optim.grad_accum_steps)
        if not all(torch.isfinite(torch.tensor(v)) for v in scalars.values()):
            raise FloatingPointError(f"non-finite training scalars at step {state.step}: {scalars}")
        state.step += 1
        state.samples_seen += global_batch
        state.first_step_at = state.first_step_at or time.time()
        bar.update(1)
        if state.step % cfg.metrics.log_every == 0 or state.step == cfg.max_steps:
            scalars["bad_samples"] = float(getattr(batches, "bad_samples", 0))  # skipped so far, all ranks
            state.last_loss = logger.log(state.step, state.samples_seen, scalars)["loss"]
        decision = control.poll()
        if (decision.save or decision.stop_signal or state.step % cfg.checkpoint.every_steps == 0
                or state.step in (cfg.max_steps, stop_step)):
            save(state)
            control.saved()
            logger.reset_timer(state.step)
        if decision.stop_signal:
            state.stop_signal = decision.stop_signal
            break
        if cfg.metrics.eval_every and state.step % cfg.metrics.eval_every == 0 and state.step < cfg.max_steps:
            logger.log(state.step, state.samples_seen, evaluate(state.step), prefix="eval")
            logger.reset_timer(state.step)
    bar.close()
    return state
