"""The training loop, on one screen: batch -> step -> log -> eval -> checkpoint -> stop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from tqdm import tqdm

from train.checkpoint import TrainState
from train.control import Decision
from train.step import train_step
from train.system import progress_enabled

if TYPE_CHECKING:
    from train.main import Run

T = TypeVar("T")


def train_loop(run: "Run", stop_step: int) -> None:
    """Train from `run.state.step` to `stop_step` (<= max_steps) or a stop signal, advancing run.state.

    `run.save`, `run.evaluate` and `run.control.poll` are collective: every rank reaches them at the same
    step. A signal (any rank) makes every rank save at once and stop; `run.state.stop_signal` tells the caller.
    """
    cfg, state, logger, clock = run.cfg, run.state, run.logger, run.clock
    bar = tqdm(
        total=cfg.max_steps,
        initial=state.step,
        disable=not progress_enabled(run.env.is_main),
        mininterval=5.0,
        desc="train",
    )
    if state.eval_pending:  # the stopped job saved on an evaluation step without evaluating
        scores = timed_pause(state, run.evaluate)
        if scores is None:  # stopped again: the checkpoint still says pending
            state.stop_signal = run.stopped
            bar.close()
            return
        logger.log(state.step, state.samples_seen, scores, prefix="eval")
        state.eval_pending = False
    clock.begin(state.step)  # this job's training time per step counts from here (evaluations: state.paused_s)
    while state.step < min(stop_step, cfg.max_steps):
        scalars = train_step(run)
        state.skipped_in_a_row = int(scalars.pop("skipped")) * (state.skipped_in_a_row + 1)
        state.skipped_steps += state.skipped_in_a_row > 0
        if state.skipped_in_a_row > cfg.optim.max_skipped_steps:
            failed, streak = state.step + 1, state.skipped_in_a_row
            # the streak shows in TensorBoard whatever metrics.log_every (collective: every rank is here)
            logger.log(failed, state.samples_seen + run.global_batch, {**scalars, "skipped_steps": state.skipped_steps})
            raise FloatingPointError(
                f"{streak} steps in a row, steps {failed - streak + 1}-{failed}, had a non-finite loss or gradient "
                f"(last: {scalars}); nothing was updated. Raise optim.warmup_steps or set optim.grad_clip (both "
                "apply on resume), or lower optim.lr / optim.head_lr in a new run (another name=, or "
                "checkpoint.resume=false, which sets this run's checkpoints aside: a resume keeps its checkpoint's "
                f"learning rates); optim.max_skipped_steps={cfg.optim.max_skipped_steps} sets how many are tolerated"
            )
        state.step += 1
        state.samples_seen += run.global_batch
        state.first_step_at = state.first_step_at or time.time()
        bar.update(1)
        if state.step % cfg.metrics.log_every == 0 or state.step == cfg.max_steps:
            scalars["bad_samples"] = float(run.stream.bad_samples)  # skipped so far, all ranks
            scalars["skipped_steps"] = float(state.skipped_steps)  # the same on every rank
            system = clock.window(state.step, state.paused_s)  # the steps since the last log, save or evaluation
            scalars["img_per_s"] = system.pop("img_per_s", float("nan"))
            train = logger.log(state.step, state.samples_seen, scalars)
            state.last_loss = train["loss"]
            logged = {"train": train, "system": logger.log(state.step, state.samples_seen, system, prefix="system")}
            state.last_logged = {"step": state.step, "samples": state.samples_seen, "scalars": logged}
        decision = run.control.poll()
        every = cfg.metrics.eval_every
        eval_due = bool(every) and state.step % every == 0 and state.step < cfg.max_steps  # the end: main's
        # evaluate before saving, so the checkpoint's best-so-far has this step's scores; a stopped job saves
        # first (its time is short) and the resumed one evaluates
        if eval_due and not decision.stop_signal:
            scores = timed_pause(state, run.evaluate)  # None: a stop signal came between two sets: save and stop
            if scores is None:
                decision = Decision(save=decision.save, stop_signal=run.stopped)
            else:
                logger.log(state.step, state.samples_seen, scores, prefix="eval")
            clock.reset(state.step)
        if (
            decision.save
            or decision.stop_signal
            or state.step % cfg.checkpoint.every_steps == 0
            or state.step in (cfg.max_steps, stop_step)
        ):
            state.eval_pending = eval_due and bool(decision.stop_signal)
            timed_pause(state, run.save)
            run.control.saved()
            clock.reset(state.step)
        if decision.stop_signal:
            state.stop_signal = decision.stop_signal
            break
    bar.close()


def timed_pause(state: TrainState, work: Callable[[], T]) -> T:
    """work() (an evaluation or a save), its seconds added to state.paused_s (the ETA spreads them over the
    steps; saved with the checkpoints, so a requeued job's ETA has them before it has been through one)."""
    start = time.perf_counter()
    try:
        return work()
    finally:
        state.paused_s += time.perf_counter() - start
