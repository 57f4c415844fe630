"""`run(cfg)`: one training job, a pure function of its config and its environment.

`Run.build` assembles the job in one visible order: data checks -> resume point -> model -> engine ->
head -> resume -> stream -> logger. `run()` then trains (train/loop.py), evaluates, exports and writes the
summary. A requeued job needs no flag: the run directory's latest checkpoint is always picked up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import time
from collections.abc import Iterator

import numpy as np
import torch

from common.seeds import stable_seed
from data.bad_ledger import FOLDER as BAD_SAMPLES
from data.balanced import balance_notes
from data.mixture import deal_notes, train_sources
from data.stream import TrainBatches, build_train_loader
from data.transforms import InputNormaliser
from model.backbone import build_backbone, check_trunk_weights
from model.task import MetricLearningTask, build_head
from train import checkpoint as ckpt
from train.config import RunConfig, save_yaml
from train.control import RunControl, stop_signals
from train.dist import (
    DistEnv,
    barrier,
    broadcast_object,
    broadcast_running_stats_,
    destroy_distributed,
    env_from_environ,
    init_distributed,
    slurm_job_id,
)
from train.elastic import convert_to_universal, needs_universal
from train.engine import build_engine, build_head_optimizer, embedding_grad_scale
from train.evaluate.protocols import evaluate_sets, flatten, update_best
from train.evaluate.report import write_eval_files
from train.evaluate.sets import EvalSet, resolve_eval_sets
from train.export import export
from train.loop import train_loop
from train.tensorboard_logger import TensorBoardLogger, run_hparams
from train.step import TrainableModel
from train.stream_state import saved_stream_positions, stream_changes
from train.run_owner import other_owner, record_owner, release_owner
from train.summary import RunSummary
from train.system import StepClock


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(
    cfg: RunConfig, env: DistEnv, device: torch.device, resume_from: str | None
) -> tuple[TrainableModel, ckpt.TrainState]:
    """Model, engine, head and optimizers, restored from `resume_from` when given (collective).

    A checkpoint from another world size is first converted to a universal one (rank 0), and the
    engine is built to load it (train/elastic.py); the head is re-sliced by class range.
    """
    meta = ckpt.read_meta(resume_from) if resume_from else {}
    changes = ckpt.engine_changes(resume_from, cfg, env.world_size) if resume_from else []
    universal = bool(resume_from) and needs_universal(str(resume_from), bool(changes))
    if universal:
        if env.is_main:
            seconds = convert_to_universal(str(resume_from))
            print(
                f"checkpoint {resume_from} was {' and '.join(changes)}: universal checkpoint ready ({seconds:.1f} s)",
                flush=True,
            )
        barrier()
    input_dtype = torch.bfloat16 if cfg.zero.bf16 else torch.float32
    # the weight-decay groups the checkpoint's optimizer state was saved with (older ones: 1-D tensors only)
    decay_groups = str(meta.get("decay_groups", "ndim")) if meta else "timm"
    if decay_groups != "timm" and env.is_main:
        print(
            f"note: {resume_from} predates the no_weight_decay() groups; this run keeps weight decay on "
            "what the trunk's no_weight_decay() names (ViT pos_embed, cls_token) so its optimizer state loads",
            flush=True,
        )
    # layer-wise lr decay: its optimizer groups are the checkpoint's too (their lrs come back with its schedule)
    layer_decay = float(meta.get("layer_decay", 1.0)) if meta else cfg.optim.layer_decay
    if layer_decay != cfg.optim.layer_decay and env.is_main:
        print(
            f"note: {resume_from} trained with optim.layer_decay={layer_decay:g}; the run keeps it (its optimizer "
            f"state and learning rates are per layer group), not optim.layer_decay={cfg.optim.layer_decay:g}",
            flush=True,
        )
    engine = build_engine(
        build_backbone(cfg.model),
        cfg.optim,
        cfg.zero,
        cfg.data.batch_size,
        cfg.max_steps,
        load_universal=universal,
        compile_scope=cfg.model.compile_scope if cfg.model.compile else "",
        decay_groups=decay_groups,
        layer_decay=layer_decay,
    )
    if env.is_main and cfg.model.checkpoint_path and not resume_from:  # a resume's weights are its checkpoint's
        print(f"trunk weights: {cfg.model.checkpoint_path}", flush=True)
    if env.is_main and layer_decay < 1:
        scales = sorted({group["lr_scale"] for group in engine.client_optimizer.param_groups})
        print(
            f"optim.layer_decay={layer_decay:g}: {len(scales)} layers, lr x {scales[0]:.3g} (the stem) to x 1 (the top "
            "layer and the neck)",
            flush=True,
        )
    head = build_head(
        cfg.loss,
        cfg.data.num_classes,
        cfg.model.embed_dim,
        env.rank,
        env.world_size,
        embedding_grad_scale=embedding_grad_scale(engine),
    ).to(device)
    head_opt, head_sched = build_head_optimizer(head, cfg.optim, cfg.max_steps)
    model = TrainableModel(
        engine, MetricLearningTask(engine, head), head_opt, head_sched, device, input_dtype, InputNormaliser(cfg.data)
    )
    # Every rank built the same backbone from the same seed; from here each draws its own random numbers
    # (drop-path and dropout masks, as timm seeds seed + rank): with one shared stream every rank dropped
    # the same blocks for its i-th sample. A resume at the same world size restores each rank's saved
    # state over this; at another world size the step joins the seed, so the streams do not repeat step 0's.
    seed_everything(stable_seed(cfg.seed, "rank", env.rank, "step", meta.get("step", 0)) % 2**32)
    state = ckpt.TrainState(layer_decay=layer_decay)
    if resume_from:
        state = ckpt.load_checkpoint(resume_from, env, engine, head, head_opt, head_sched, universal)
        if env.is_main:
            print(f"resumed from {resume_from} at step {state.step}", flush=True)
            changed = stream_changes(resume_from, cfg, env.world_size)
            if changed:
                print(
                    f"warning: data stream settings changed since the checkpoint ({'; '.join(changed)}): "
                    "the stream continues deterministically at the same position in the epoch, but not batch for "
                    "batch (with other ranks x workers, part of the epoch repeats and as much is not read)",
                    flush=True,
                )
            changed = ckpt.config_changes(resume_from, cfg)
            if changed:
                # DeepSpeed restores the backbone's groups whole; the head's files hold its state, not its groups
                groups = any(c.startswith(("optim.weight_decay", "optim.beta")) for c in changed)
                print(
                    f"warning: settings changed since the checkpoint ({'; '.join(changed)}); the base learning rates "
                    "stay the checkpoint's (start a new run, name=..., to change optim.lr or optim.head_lr), the "
                    "schedule's shape (optim.warmup_steps, optim.min_lr_ratio, max_steps) is this run's from here"
                    + (
                        "; the backbone's AdamW keeps the checkpoint's weight decay and betas, while the head's "
                        "optimizer (and CHEST's FC) takes this run's"
                        if groups
                        else ""
                    ),
                    flush=True,
                )
            saved = ckpt.read_meta(resume_from)
            was = saved.get("global_batch") or saved["world_size"] * cfg.data.batch_size * cfg.optim.grad_accum_steps
            now = env.world_size * cfg.data.batch_size * cfg.optim.grad_accum_steps
            if was != now:  # max_steps, warm-up and the schedule count steps, not samples
                print(
                    f"warning: the global batch changes from {was} to {now} images a step ({saved['world_size']} -> "
                    f"{env.world_size} ranks x data.batch_size x optim.grad_accum_steps): the remaining "
                    f"{cfg.max_steps - state.step} steps see {now * (cfg.max_steps - state.step)} images instead of "
                    f"{was * (cfg.max_steps - state.step)}; to keep the batch set "
                    f"{keep_global_batch(was, env.world_size, cfg)}",
                    flush=True,
                )
    return model, state


def keep_global_batch(was: int, world_size: int, cfg: RunConfig) -> str:
    """The override(s) that give `was` images a step on `world_size` ranks (fewer ranks: more accumulation;
    more ranks: a smaller per-rank batch)."""
    per_rank = was / world_size
    options = []
    if per_rank % cfg.data.batch_size == 0:
        options.append(f"optim.grad_accum_steps={int(per_rank // cfg.data.batch_size)}")
    if per_rank % cfg.optim.grad_accum_steps == 0:
        options.append(f"data.batch_size={int(per_rank // cfg.optim.grad_accum_steps)}")
    return " or ".join(options) or f"data.batch_size x optim.grad_accum_steps = {per_rank:g} (not whole here)"


def stream_start(state: ckpt.TrainState, cfg: RunConfig, env: DistEnv) -> int:
    """The micro-batch each rank's stream resumes at: the samples the run has read, over this run's images per
    micro-batch and rank. At the checkpoint's world size and batch that is step x grad_accum_steps; after a
    change it keeps the position in the epoch (step x the new batch would skip or replay up to the rest of it:
    2 -> 4 ranks had skipped the rest of the epoch and part of the next)."""
    return state.samples_seen // (cfg.data.batch_size * env.world_size)


@dataclasses.dataclass
class Run:
    """One job's parts, owned together: what the loop and the step read, what `save`, `evaluate` and
    `close` act on. Built by `Run.build` (collective); `close` releases the data workers, the logger and the
    run dir's owner record (train/run_owner.py)."""

    cfg: RunConfig
    env: DistEnv
    device: torch.device
    control: RunControl
    model: TrainableModel
    state: ckpt.TrainState
    eval_sets: list[EvalSet]
    stream: TrainBatches  # the loader: closed by close(), its bad-sample count logged
    logger: TensorBoardLogger
    clock: StepClock
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]  # the stream as the step reads it (the clock times it)
    resumed_from_step: int

    @classmethod
    def build(cls, cfg: RunConfig, env: DistEnv, device: torch.device, control: RunControl) -> "Run":
        seed_everything(cfg.seed)  # same on every rank: identical backbone init (build_model then splits the streams)
        # Cheap checks first: a bad data set or an incompatible checkpoint fails before any model is built.
        check_trunk_weights(cfg.model, f"run {cfg.name}")  # the pretrained weights the recipe needs are named
        train_sources(cfg.data)  # every source's shards and class count
        eval_sets = resolve_eval_sets(cfg.data, cfg.metrics)  # held-out split and metrics.eval_sets, checked
        resume = ckpt.wants_resume(cfg.checkpoint.resume, os.environ)
        resume_from = ckpt.agreed_latest(cfg.run_dir, env) if resume else None
        if resume_from:
            ckpt.check_resumable(resume_from, cfg)
        owner = broadcast_object(other_owner(cfg.run_dir) if env.is_main else None)  # one answer for all ranks
        if owner:
            raise RuntimeError(
                f"run dir {cfg.run_dir} is in use by {owner}: two jobs would write and prune the same "
                "checkpoints; wait for it to end (or cancel it), or give this run another name (name=...)"
            )
        if env.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            aside = None if resume else ckpt.set_aside_checkpoints(cfg.run_dir)
            if aside:  # its own saves would otherwise be pruned as older than the old run's (and a requeue lost)
                print(f"checkpoint.resume=false: the run dir's earlier checkpoints moved to {aside}", flush=True)
            save_yaml(cfg, os.path.join(cfg.run_dir, "config.yaml"))
            record_owner(cfg.run_dir, slurm_job_id())  # a second submission into this run dir is refused
            print(f"config of run {cfg.name}:\n{json.dumps(cfg.to_dict(), indent=1)}", flush=True)
            for note in [*cfg.warnings(), *balance_notes(cfg.data), *deal_notes(cfg.data, env.world_size)]:
                if note:
                    print(f"warning: {note}", flush=True)
        barrier()
        model, state = build_model(cfg, env, device, resume_from)
        stream = build_train_loader(
            cfg.data,
            env.rank,
            env.world_size,
            stream_start(state, cfg, env),
            os.path.join(cfg.run_dir, BAD_SAMPLES),
            saved_stream_positions(resume_from, cfg, env) if resume_from else None,
        )
        global_batch = cfg.data.batch_size * env.world_size * cfg.optim.grad_accum_steps
        clock = StepClock(global_batch, env.world_size, cfg.max_steps, device)
        return cls(
            cfg,
            env,
            device,
            control,
            model,
            state,
            eval_sets,
            stream,
            TensorBoardLogger(cfg.run_dir, env.is_main, state.step, state.samples_seen, logs_again(state, cfg)),
            clock,
            clock.timed(iter(stream)),
            resumed_from_step=state.step,
        )

    @property
    def global_batch(self) -> int:
        return self.clock.global_batch

    def save(self) -> str:
        """A collective checkpoint of the current state."""
        return ckpt.save_checkpoint(
            self.cfg,
            self.env,
            self.state,
            self.model.engine,
            self.model.task.head,
            self.model.head_optimizer,
            self.model.head_scheduler,
            self.stream.positions,
        )

    def evaluate_sets(self) -> list[dict[str, float]] | None:
        """Every evaluation set's scores (collective; pictures of the first set); state.best is updated. None:
        a stop signal came (agreed between two sets, `self.stopped`): the job saves and stops instead, within
        one set's time of Slurm's warning, and the resumed job evaluates."""
        task, head, step = self.model.task, self.model.task.head, self.state.step
        table = next(iter(head.sharded_parameters().values()))
        broadcast_running_stats_(self.model.engine.module)  # rank 0's, as the checkpoint stores them
        self.model.engine.eval()
        per_set = evaluate_sets(
            self.eval_sets,
            task,
            self.cfg.data,
            self.cfg.metrics,
            self.env.rank,
            self.env.world_size,
            self.device,
            self.model.model_input,
            on_embeddings=lambda spaces, labels: self.logger.log_embeddings(
                step, spaces, labels, table, head=head, protocol=self.eval_sets[0].protocol
            ),
            stop=lambda: bool(self.control.poll().stop_signal),
        )
        self.model.engine.train()
        if per_set is not None:
            update_best(self.state.best, flatten(self.eval_sets, per_set))
        return per_set

    @property
    def stopped(self) -> int:
        """The stop signal the ranks last agreed on (0: none): what an evaluation that returned None met."""
        return self.control.agreed_stop

    def with_best(self, values: dict[str, float]) -> dict[str, float]:
        """What is logged at an evaluation: the scores and, under best/, the best of each so far."""
        return {**values, **{f"best/{k}": v for k, v in self.state.best.items()}}

    def evaluate(self) -> dict[str, float] | None:
        """Every set's scores, flattened, with the best so far (collective); None when a stop signal came."""
        per_set = self.evaluate_sets()
        return None if per_set is None else self.with_best(flatten(self.eval_sets, per_set))

    def close(self) -> None:
        self.stream.close()
        self.logger.close()
        if self.env.is_main:
            release_owner(self.cfg.run_dir)


def logs_again(state: ckpt.TrainState, cfg: RunConfig) -> dict[str, dict[str, float]] | None:
    """What the checkpoint's job logged at its step, when this job logs at that step again (a pending or the
    final evaluation): the logger purges that step and writes these again; None otherwise."""
    if state.step == 0 or not (state.eval_pending or state.step >= cfg.max_steps):
        return None
    last = state.last_logged
    return dict(last["scalars"]) if last.get("step") == state.step else {}


def finish(run: Run, t0: float, train_s: float) -> RunSummary:
    """After training to max_steps: final evaluation, its files, the export and the hparams entry."""
    cfg, env, state = run.cfg, run.env, run.state
    final: dict[str, float] = {}
    rows: list[str] = []
    if state.step >= cfg.max_steps and not state.stop_signal:
        # a signal that came during the last save: the final evaluation and export may not fit in the time
        # left; the requeued job resumes at max_steps and does them (collective, as in the loop)
        state.stop_signal = run.control.poll().stop_signal
    done = state.step >= cfg.max_steps and not state.stop_signal
    per_set = run.evaluate_sets() if done and run.eval_sets else []  # a preempted job leaves them to its successor
    if per_set is None or (done and cfg.checkpoint.export and run.control.poll().stop_signal):
        state.stop_signal, done = run.stopped, False  # warned during the evaluation: the requeued job does it all
    if done and per_set:
        final = flatten(run.eval_sets, per_set)
        run.logger.log(state.step, state.samples_seen, run.with_best(final), prefix="eval")
        if env.is_main:
            latest = ckpt.find_latest(cfg.run_dir)
            rows = write_eval_files(cfg.run_dir, run.eval_sets, per_set, state.step, latest)
            print("\n".join(rows), flush=True)
            if latest:
                ckpt.record_final_best(latest, state.step, state.best)
    if done and cfg.checkpoint.export and env.is_main:
        print(f"exported backbone and proxy table to {export(cfg.run_dir)}", flush=True)
    summary = RunSummary(
        run_dir=os.path.abspath(cfg.run_dir),
        tensorboard_dir=os.path.abspath(run.logger.tb_dir),
        checkpoint=ckpt.find_latest(cfg.run_dir),
        step=state.step,
        resumed_from_step=run.resumed_from_step,
        last_train_loss=state.last_loss,
        stop_signal=signal.Signals(state.stop_signal).name if state.stop_signal else "",
        world_size=env.world_size,
        started_at=t0,
        first_step_at=state.first_step_at,
        train_seconds=train_s,
        total_seconds=time.time() - t0,
        skipped_steps=state.skipped_steps,
        rows=rows,
        best=dict(state.best),
        metrics=final,
    )
    if done:
        run.logger.log_hparams(
            {**run_hparams(cfg.to_dict(), cfg.run_root), "global_batch": run.global_batch},
            {**final, "last_train_loss": state.last_loss},
            step=state.step,
        )
    if env.is_main:
        summary.write(os.path.join(cfg.run_dir, "summary.json"))
    return summary


def run(cfg: RunConfig, stop_at_step: int | None = None, requeue_signal: signal.Signals = signal.SIGUSR2) -> RunSummary:
    """Train (or resume) the run `cfg.name` to `cfg.max_steps`, evaluate, and return its summary.

    `stop_at_step` ends the job early, after a checkpoint, as a preempted job would; the schedule
    still spans `cfg.max_steps`, so a later `run(cfg)` continues exactly where this one stopped.
    `requeue_signal` (USR2, or submitit's SUBMITIT_PREEMPT_SIGNAL) or TERM (train.control) make every rank
    save at the next step and return early too; the summary's `stop_signal` names it (the caller requeues:
    slurm/job.py, launch/rank.py).
    """
    cfg = cfg.resolved()  # e.g. data.norm=timm -> the backbone's values, before anything records the config
    t0 = time.time()
    env = env_from_environ()
    # handlers first: a signal during setup is kept
    control = RunControl(cfg.checkpoint.every_minutes, stop_signals(requeue_signal))
    device, owns_group = init_distributed(env)
    job: Run | None = None
    try:
        job = Run.build(cfg, env, device, control)
        train_t0 = time.time()
        train_loop(job, stop_at_step or cfg.max_steps)
        return finish(job, t0, time.time() - train_t0)
    finally:
        if job is not None:
            job.close()
        control.close()
        if owns_group:
            destroy_distributed()
