"""TensorBoardLogger: the one path from scalars to TensorBoard and the console.

Scalars are reduced (mean) across ranks by the caller-facing `log`, written on rank 0 only, against
the optimizer step and, under `by_samples/`, against samples seen, so runs with different global
batches line up. Throughput and step times come from train/system.py's StepClock.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from typing import Any

import torch

from model.proxies import ShardedHead
from train.dist import reduce_mean

SUMMED = frozenset({"bad_samples"})  # totals over ranks, not means
# The config entries shown in the HPARAMS tab (flattened names; loss.* is added whole, see main_hparams)
MAIN_HPARAMS = (
    "recipe",
    "seed",
    "max_steps",
    "data.batch_size",
    "data.samples_per_class",
    "data.image_size",
    "model.name",
    "model.embed_dim",
    "optim.lr",
    "optim.head_lr",
    "optim.fc_lr",
    "optim.weight_decay",
    "optim.head_weight_decay",
    "optim.head_optimizer",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.grad_clip",
    "optim.grad_accum_steps",
    "zero.stage",
    "zero.bf16",
)


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# A sweep's record beside its points (launch.sweep): {"points": [...], "hparams": [the keys that differ]}
SWEEP_FILE = "sweep.json"
# The sweep's one HPARAMS experiment (the union of its points' settings and scores), a run of its own
SWEEP_EXPERIMENT_DIR = "hparams"


def sweep_keys(run_root: str) -> list[str] | None:
    """The settings that differ across the points of the sweep whose point folders `run_root` holds; None
    when `run_root` is not a sweep's folder."""
    path = os.path.join(run_root, SWEEP_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return list(json.load(f).get("hparams", []))


def run_hparams(config: dict[str, Any], run_root: str) -> dict[str, Any]:
    """What a run shows in the HPARAMS tab: `main_hparams`, and in a sweep also every swept setting (a grid
    over e.g. model.drop_path_rate showed points with identical hyperparameters)."""
    flat = flat_config(config)
    return {**main_hparams(config), **{k: flat[k] for k in sweep_keys(run_root) or [] if k in flat}}


def hparams_values(hparams: dict[str, Any]) -> dict[str, int | float | str]:
    """Flattened; values that are not numbers or strings as strings; None left out (TensorBoard's types)."""
    return {
        k: v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else str(v)
        for k, v in flat_config(hparams).items()
        if v is not None
    }


def hparams_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """`hparams/<name>` of every finite number."""
    return {
        f"hparams/{k}": float(v)
        for k, v in flat_config(metrics).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def write_sweep_experiment(sweep_dir: str, sessions: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """One HPARAMS experiment for a sweep's points ((hparams, metrics) each): the union of their settings and
    scores, in `<sweep_dir>/hparams/` (replacing an earlier one). TensorBoard shows one experiment per logdir
    and takes the first it finds, so the points write none themselves (train.tensorboard_logger.log_hparams):
    a DistArc point's would have hidden a CHEST point's loss.chest.* and Poincare scores."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    union: dict[str, int | float | str] = {}
    seen: dict[str, set] = {}
    scores: dict[str, float] = {}
    for hparams, metrics in sessions:
        for k, v in hparams_values(hparams).items():
            union.setdefault(k, v)
            seen.setdefault(k, set()).add(v)
        scores.update(hparams_scores(metrics))
    discrete = {k: sorted(vs, key=str) for k, vs in seen.items() if isinstance(union[k], str)}
    kinds = {k: {isinstance(x, str) for x in vs} for k, vs in seen.items()}
    union = {k: v for k, v in union.items() if len(kinds[k]) == 1}  # one type a column: numbers or text
    folder = os.path.join(sweep_dir, SWEEP_EXPERIMENT_DIR)
    shutil.rmtree(folder, ignore_errors=True)
    writer = SummaryWriter(folder)
    experiment, _, _ = hparams_summaries(union, scores, {k: v for k, v in discrete.items() if k in union})
    writer._get_file_writer().add_summary(experiment)
    writer.close()


def main_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The main hyperparameters of a run config (`RunConfig.to_dict()`), flattened: MAIN_HPARAMS and the
    loss settings (loss.chest.* only for the CHEST / SoftTriple heads, whose fields they are)."""
    flat = flat_config(config)
    chest = flat.get("loss.name") in ("chest", "softtriple")
    return {
        k: v
        for k, v in flat.items()
        if k in MAIN_HPARAMS or (k.startswith("loss.") and (chest or not k.startswith("loss.chest.")))
    }


class TensorBoardLogger:
    """Rank-0 SummaryWriters at `<run_dir>/tb` (steps) and `<run_dir>/tb/by_samples` (the same scalars against
    samples seen); every rank must call `log` (it all-reduces).

    A resumed run (`resume_step` > 0) purges what a dead job wrote after its checkpoint: TensorBoard drops the
    earlier files' events at or past the purge step (steps after resume_step, samples after resume_samples),
    so the curves show each step once. The two x axes need their own folders: one purge step for both would
    drop the whole by_samples history (its steps are sample counts). A job that logs at resume_step again (the
    final evaluation of a finished run started again, or an evaluation its predecessor left pending) purges
    from resume_step on and writes `rewrite`, what the checkpoint says was logged at that step, once more.
    The projector's list of embeddings is the earlier jobs' (up to the purge) plus this job's."""

    def __init__(
        self,
        run_dir: str,
        is_main: bool,
        resume_step: int = 0,
        resume_samples: int = 0,
        rewrite: dict[str, dict[str, float]] | None = None,
    ) -> None:
        self.is_main = is_main
        self.tb_dir = os.path.join(run_dir, "tb")
        self.writer = self.samples_writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            resumed = resume_step > 0
            again = int(rewrite is not None)  # 1: the events at resume_step go too
            self.writer = SummaryWriter(self.tb_dir, purge_step=resume_step + 1 - again if resumed else None)
            self.samples_writer = SummaryWriter(
                os.path.join(self.tb_dir, "by_samples"), purge_step=resume_samples + 1 - again if resumed else None
            )
            if resumed:
                self._keep_projector_entries(before_step=resume_step + 1 - again)
            for prefix, values in (rewrite or {}).items():
                self._write(resume_step, resume_samples, values, prefix)

    def _keep_projector_entries(self, before_step: int) -> None:
        """Start from the earlier jobs' projector_config.pbtxt (SummaryWriter starts an empty list and rewrites
        the file at its first add_embedding, which dropped every earlier step's embeddings from the projector)."""
        path = os.path.join(self.tb_dir, "projector_config.pbtxt")
        if self.writer is None or not os.path.isfile(path):
            return
        from google.protobuf import text_format
        from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

        with open(path, encoding="utf-8") as f:
            earlier = text_format.Parse(f.read(), ProjectorConfig())
        kept = ProjectorConfig()
        kept.embeddings.extend(e for e in earlier.embeddings if int(e.tensor_name.rsplit(":", 1)[-1]) < before_step)
        self.writer._projector_config = kept  # SummaryWriter's own list (torch keeps no public handle on it)

    def log(self, step: int, samples_seen: int, scalars: dict[str, float], prefix: str = "train") -> dict[str, float]:
        """Reduce `scalars` over ranks, write them; returns the reduced values."""
        values = reduce_mean(scalars, summed=SUMMED)
        self._write(step, samples_seen, values, prefix)
        return values

    def _write(self, step: int, samples_seen: int, values: dict[str, float], prefix: str) -> None:
        if self.writer is not None and self.samples_writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
                self.samples_writer.add_scalar(f"by_samples/{prefix}/{key}", value, samples_seen)
            self.writer.flush()
            self.samples_writer.flush()
            text = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
            print(f"[{prefix}] step {step} samples {samples_seen} {text}", file=sys.stdout, flush=True)

    def log_embeddings(
        self,
        step: int,
        spaces: dict[str, torch.Tensor],
        labels: torch.Tensor,
        table_rows: torch.Tensor | None = None,
        max_points: int = 1000,
        head: ShardedHead | None = None,
        protocol: str = "classification",
    ) -> None:
        """Pictures of the embedding spaces (rank 0): TensorBoard projector points coloured by label
        (a seeded sample of `max_points` evaluation samples of one space: the Poincare ball's where there is one,
        else the first), histograms of every space's embedding norms and of the class-table row norms of rank
        0's shard.

        `protocol` says what the labels are: the head's classes ("classification"), other identities
        (open-set "retrieval", "query_gallery") or pair ids ("verification"). Labels that identify,
        give eval/sim_positive and eval/sim_negative (cosine similarities of seeded random pairs); with
        `head`, class labels also give the anchor pictures: eval/poincare_disk (CHEST; open-set points
        without proxies too), eval/radial_angular and the eval/radius_error histogram (DistArc).
        Cost: a few thousand pairs and at most `max_points` points per figure, no collectives.

        Only rank 0 gets here, so a failure must not end the run (the other ranks would wait for it in
        their next collective until the timeout): it is reported and the pictures of this step skipped.
        Non-finite values (a diverged model's embeddings) are left out of the histograms.
        """
        if self.writer is None:
            return
        try:
            self._log_embeddings(step, spaces, labels, table_rows, max_points, head, protocol)
        except Exception as err:  # noqa: BLE001 - monitoring only; the scores are logged apart from it
            print(f"[tensorboard] pictures of step {step} skipped: {type(err).__name__}: {err}", file=sys.stderr)
        self.writer.flush()

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """add_histogram of the finite values (TensorBoard refuses NaN and an empty histogram)."""
        assert self.writer is not None
        finite = values[torch.isfinite(values)]
        if finite.numel():
            self.writer.add_histogram(tag, finite, step)

    def _log_embeddings(
        self,
        step: int,
        spaces: dict[str, torch.Tensor],
        labels: torch.Tensor,
        table_rows: torch.Tensor | None,
        max_points: int,
        head: ShardedHead | None,
        protocol: str,
    ) -> None:
        assert self.writer is not None
        from train.pictures import sample_rows  # here: matplotlib is imported only when a run draws

        seen: set[int] = set()
        # The projector gets one space an evaluation (its points are text: CHEST's three spaces at 768/512 dims
        # wrote ~35 MB each time), the ball's where there is one
        projected = "poincare" if "poincare" in spaces else next(iter(spaces), "")
        for space, points in spaces.items():
            if points.data_ptr() in seen:  # e.g. "cosine" ranks the same vectors as "euclidean"
                continue
            seen.add(points.data_ptr())
            self._histogram(f"eval/{space}_norm", points.detach().float().norm(dim=1).cpu(), step)
            if space != projected:
                continue
            # a seeded sample, as the pictures': the first rows are rank 0's first shards (a split stored class
            # by class showed a few classes); the norms of every point
            rows = sample_rows(points.shape[0], max_points)
            pts = points[rows.to(points.device)].detach().float().cpu()
            stale = os.path.join(self.tb_dir, f"{step:05d}", space)  # torch's folder for (step, tag)
            if os.path.isdir(stale):  # this step evaluated again (a finished run started again): its points are
                shutil.rmtree(stale)  # replaced, without torch's "Embedding dir exists" line
            self.writer.add_embedding(pts, metadata=labels.cpu()[rows].tolist(), tag=space, global_step=step)
        if table_rows is not None and table_rows.numel():
            rows = table_rows.detach().float().cpu()
            self._histogram("head/row_norm_rank0", rows.reshape(rows.shape[0], -1).norm(dim=1), step)
        if protocol != "verification" and spaces:
            from train import pictures

            points = spaces.get("cosine", next(iter(spaces.values())))
            positive, negative = pictures.pair_similarities(points, labels)
            for tag, sims in (("eval/sim_positive", positive), ("eval/sim_negative", negative)):
                if sims.numel():
                    self._histogram(tag, sims, step)
            closed_set = protocol == "classification"
            if head is not None:
                if closed_set and head.cfg.name == "distarc" and "euclidean" in spaces:
                    self._histogram(
                        "eval/radius_error", pictures.radius_errors(spaces["euclidean"], labels, head), step
                    )
                for tag, fig in pictures.head_pictures(spaces, labels, head, closed_set, max_points).items():
                    self.writer.add_image(tag, pictures.figure_to_rgb(fig), step, dataformats="HWC")

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, Any], step: int | None = None) -> None:
        """The run's hyperparameters and final metrics for TensorBoard's HPARAMS tab (rank 0).

        Nested dicts are flattened with "." (optim.lr); values that are not numbers or strings become
        strings, None and non-finite metrics are left out. Metrics are written as scalars
        `hparams/<name>` (their own tags: the eval/ curves keep no stray point). The three hparams
        summaries go through the run's own writer (what SummaryWriter.add_hparams builds, without the
        second writer and timestamped subfolder it opens), so each run's tb dir is one session and runs line
        up in the tab when TensorBoard is pointed at their common root. The session only, no experiment:
        TensorBoard shows the first experiment it finds under its logdir, so a DistArc run's hid a CHEST run's
        loss.chest.* and Poincare scores; without one it shows the union of the sessions' settings, with every
        scalar tag as a metric column (a sweep writes one experiment over its points: write_sweep_experiment).
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        scores = hparams_scores(metrics)
        file_writer = self.writer._get_file_writer()
        summaries = hparams_summaries(hparams_values(hparams), scores)
        for summary in summaries[1:]:  # [0] is an experiment
            file_writer.add_summary(summary, step)
        for tag, value in scores.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        for writer in (self.writer, self.samples_writer):
            if writer is not None:
                writer.close()
