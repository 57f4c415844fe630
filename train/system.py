"""System scalars of the training loop: step time, data wait, throughput per GPU, peak memory, ETA.

`StepClock.timed(batches)` wraps the batch iterator so the seconds spent waiting for the loader are
counted apart from the step; `StepClock.window()` turns the interval since the last call into the
`system/` scalars the logger writes. Peak memory (of the window, an evaluation or a save in it included) and
the data-wait fraction are maxima over ranks
(all-reduces at log steps only): the rank nearest its memory limit, or the one starving for data while
the others wait for it inside a collective, is the one that matters; a mean would hide it
(`data_wait_frac_mean` is logged beside). The ETA uses the wall time per step since `begin()`,
evaluations and saves included, which the step time leaves out.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Iterator, TypeVar

import torch

from common.procfs import proc_status_mb

from train.dist import max_over_ranks

T = TypeVar("T")


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory of this process since the last `reset_peak_memory` (CUDA), else its peak
    resident set size (CPU: Linux's VmHWM, which clear_refs resets), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        return proc_status_mb("VmHWM")["VmHWM"] / 1024
    except (OSError, KeyError):  # not Linux: the peak since the start
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_memory(device: torch.device) -> None:
    """Start the next peak at what is in use now: each log window's peak is its own, so a step that grows
    shows (a peak since the start stays at its first high point, an evaluation's, for the rest of the run)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: VmHWM back to the present resident set
    except OSError:  # not Linux: the peak since the start
        pass


class StepClock:
    """Wall time of the steps between two `window()` calls and the part of it spent waiting for data."""

    def __init__(self, global_batch: int, world_size: int, max_steps: int, device: torch.device) -> None:
        self.global_batch, self.world_size, self.max_steps, self.device = global_batch, world_size, max_steps, device
        self.data_wait_s = 0.0
        self.begin(0)

    def begin(self, step: int) -> None:
        """Start timing this job's training at `step` (a resumed job counts from its own first step)."""
        self._trained_s, self._trained_steps = 0.0, 0  # this job's windows: training time alone
        self.reset(step)

    def reset(self, step: int) -> None:
        """Start a new window at `step` (after evaluation or a checkpoint, which are not training time)."""
        self._start, self._step, self.data_wait_s = time.perf_counter(), step, 0.0

    def timed(self, batches: Iterator[T]) -> Iterator[T]:
        """`batches`, counting the seconds each `next` blocks into `data_wait_s`."""
        while True:
            start = time.perf_counter()
            try:
                item = next(batches)
            except StopIteration:
                return
            self.data_wait_s += time.perf_counter() - start
            yield item

    def window(self, step: int, paused_s: float = 0.0) -> dict[str, float]:
        """Scalars of the steps since the last window (collective: every rank calls it), then reset.

        `paused_s`: the seconds the run's evaluations and saves took up to `step` (over every job: a
        requeued job would otherwise leave them out of its ETA until it has been through one itself); the ETA
        is the remaining steps at this job's training time per step plus that pause time per step so far."""
        now = time.perf_counter()
        elapsed, steps = now - self._start, step - self._step
        out: dict[str, float] = {"peak_mem_gb": max_over_ranks(peak_memory_gb(self.device))}
        reset_peak_memory(self.device)  # not in reset(): an evaluation's or a save's peak shows in its window
        wait = min(1.0, self.data_wait_s / elapsed) if steps > 0 and elapsed > 0 else 0.0
        slowest_wait = max_over_ranks(wait)  # collective: every rank calls it, whatever its window
        if steps > 0 and elapsed > 0:
            step_time = elapsed / steps
            self._trained_s, self._trained_steps = self._trained_s + elapsed, self._trained_steps + steps
            wall_per_step = self._trained_s / self._trained_steps + paused_s / max(1, step)
            out.update(
                step_time_s=step_time,
                img_per_s=self.global_batch / step_time,
                data_wait_frac=slowest_wait,
                data_wait_frac_mean=wait,  # the logger averages it over ranks
                img_per_s_per_gpu=self.global_batch / step_time / self.world_size,
                eta_min=(self.max_steps - step) * wall_per_step / 60,
            )
        self.reset(step)
        return out


def progress_enabled(is_main: bool) -> bool:
    """tqdm bars only on rank 0 and only on a terminal: in a Slurm log a carriage-return bar is one
    ever-growing line, and the logger's [train] lines already report progress there."""
    return is_main and sys.stderr.isatty()
