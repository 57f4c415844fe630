"""MetricLogger: the one path from scalars to TensorBoard and the console.

Scalars are reduced (mean) across ranks by the caller-facing `log`, written on rank 0 only, against
the optimizer step and, under `by_samples/`, against samples seen, so runs with different global
batches line up. Throughput (img/s) is measured here between two log calls.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from train.dist import reduce_mean

SUMMED = frozenset({"bad_samples"})  # totals over ranks, not means


class MetricLogger:
    """Rank-0 SummaryWriter at `<run_dir>/tb`; every rank must call `log` (it all-reduces)."""

    def __init__(self, run_dir: str, is_main: bool, global_batch: int) -> None:
        self.is_main, self.global_batch = is_main, global_batch
        self.tb_dir = os.path.join(run_dir, "tb")
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tb_dir)
        self._last_time = time.perf_counter()
        self._last_step: int | None = None

    def log(self, step: int, samples_seen: int, scalars: dict[str, float], prefix: str = "train") -> dict[str, float]:
        """Reduce `scalars` over ranks, add img/s, write them; returns the reduced values."""
        values = reduce_mean(scalars, summed=SUMMED)
        now = time.perf_counter()
        if prefix == "train" and self._last_step is not None and step > self._last_step:
            values["img_per_s"] = (step - self._last_step) * self.global_batch / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
                self.writer.add_scalar(f"by_samples/{prefix}/{key}", value, samples_seen)
            self.writer.flush()
            text = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
            print(f"[{prefix}] step {step} samples {samples_seen} {text}", file=sys.stdout, flush=True)
        return values

    def log_embeddings(self, step: int, spaces: dict[str, torch.Tensor], labels: torch.Tensor,
                       table_rows: torch.Tensor | None = None, max_points: int = 1000) -> None:
        """Pictures of the embedding spaces (rank 0): TensorBoard projector points coloured by label
        (first `max_points` evaluation samples per space), histograms of embedding norms and of the
        class-table row norms of rank 0's shard."""
        if self.writer is None:
            return
        seen: set[int] = set()
        for space, points in spaces.items():
            if points.data_ptr() in seen:  # e.g. "cosine" ranks the same vectors as "euclidean"
                continue
            seen.add(points.data_ptr())
            pts = points[:max_points].detach().float().cpu()
            self.writer.add_embedding(pts, metadata=labels[:max_points].cpu().tolist(), tag=space, global_step=step)
            self.writer.add_histogram(f"eval/{space}_norm", pts.norm(dim=1), step)
        if table_rows is not None and table_rows.numel():
            rows = table_rows.detach().float().cpu()
            self.writer.add_histogram("head/row_norm_rank0", rows.reshape(rows.shape[0], -1).norm(dim=1), step)
        self.writer.flush()

    def reset_timer(self, step: int) -> None:
        """Start throughput timing afresh (after evaluation or checkpointing)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
