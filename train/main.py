"""`run(cfg)`: one training job, a pure function of its config and its environment.

Setup happens in one visible order: process group -> seed -> data checks -> resume point -> model
-> engine -> head -> resume -> stream -> loop -> final evaluation -> summary. A requeued job
needs no flag: the run directory's latest checkpoint is always picked up.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from typing import Any

import numpy as np
import torch

from data.mixture import train_sources
from data.stream import TrainBatches, build_train_loader
from data.transforms import InputNormaliser
from model.backbone import build_backbone
from model.task import MetricLearningTask, build_head
from train import checkpoint as ckpt
from train.config import RunConfig, save_yaml
from train.control import RunControl
from train.dist import DistEnv, barrier, destroy_distributed, env_from_environ, init_distributed
from train.elastic import convert_to_universal
from train.engine import build_engine, build_head_optimizer
from train.evaluate.protocols import evaluate_sets, flatten, update_best
from train.evaluate.report import write_eval_files
from train.evaluate.sets import resolve_eval_sets
from train.export import export
from train.files import write_json_atomic
from train.loop import train_loop
from train.metrics import MetricLogger, main_hparams
from train.step import Trainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_and_resume(cfg: RunConfig, env: DistEnv, device: torch.device, resume_from: str | None
                     ) -> tuple[Trainer, ckpt.TrainState]:
    """Model, engine, head and optimizers, restored from `resume_from` when given (collective).

    A checkpoint from another world size is first converted to a universal one (rank 0), and the
    engine is built to load it (train/elastic.py); the head is re-sliced by class range.
    """
    universal = bool(resume_from) and ckpt.read_meta(str(resume_from))["world_size"] != env.world_size
    if universal:
        if env.is_main:
            seconds = convert_to_universal(str(resume_from))
            print(f"checkpoint {resume_from} was written by {ckpt.read_meta(str(resume_from))['world_size']} "
                  f"ranks, resuming at {env.world_size}: universal checkpoint ready ({seconds:.1f} s)", flush=True)
        barrier()
    input_dtype = torch.bfloat16 if cfg.zero.bf16 else torch.float32
    engine = build_engine(build_backbone(cfg.model), cfg.optim, cfg.zero, cfg.data.batch_size, cfg.max_steps,
                          load_universal=universal, compile_backbone=cfg.model.compile)
    head = build_head(cfg.loss, cfg.data.num_classes, cfg.model.embed_dim, env.rank, env.world_size,
                      embedding_grad_scale=float(env.world_size)).to(device)
    head_opt, head_sched = build_head_optimizer(head, cfg.optim, cfg.max_steps)
    trainer = Trainer(engine, MetricLearningTask(engine, head), head_opt, head_sched, device, input_dtype,
                      InputNormaliser(cfg.data))
    state = ckpt.TrainState()
    if resume_from:
        state = ckpt.load_checkpoint(resume_from, env, engine, head, head_opt, head_sched)
        if env.is_main:
            print(f"resumed from {resume_from} at step {state.step}", flush=True)
            changed = ckpt.stream_changes(resume_from, cfg, env.world_size)
            if changed:
                print(f"warning: data stream settings changed since the checkpoint ({'; '.join(changed)}): "
                      "the stream continues deterministically but not batch for batch", flush=True)
    return trainer, state


def run(cfg: RunConfig, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run `cfg.name` to `cfg.max_steps`, evaluate, and return a summary.

    `stop_at_step` ends the job early, after a checkpoint, as a preempted job would; the schedule
    still spans `cfg.max_steps`, so a later `run(cfg)` continues exactly where this one stopped.
    USR2 or TERM (train.control) make every rank save at the next step and return early too;
    the summary's `stop_signal` names it (the caller requeues: slurm/job.py).
    """
    cfg = cfg.resolved()  # e.g. data.norm=timm -> the backbone's values, before anything records the config
    t0 = time.time()
    env = env_from_environ()
    control = RunControl(cfg.checkpoint.every_minutes)  # handlers first: a signal during setup is kept
    device, owns_group = init_distributed(env)
    batches: TrainBatches | None = None
    try:
        seed_everything(cfg.seed)  # same on every rank: identical backbone init before DeepSpeed's broadcast
        # Cheap checks first: a bad data set or an incompatible checkpoint fails before any model is built.
        train_sources(cfg.data)  # every source's shards and class count
        eval_sets = resolve_eval_sets(cfg.data, cfg.metrics)  # held-out split and metrics.eval_sets, checked
        resume_from = ckpt.find_latest(cfg.run_dir) if cfg.checkpoint.resume else None
        if resume_from:
            ckpt.check_compatible(resume_from, cfg)
        if env.is_main:
            os.makedirs(cfg.run_dir, exist_ok=True)
            save_yaml(cfg, os.path.join(cfg.run_dir, "config.yaml"))
            print(f"config of run {cfg.name}:\n{json.dumps(cfg.to_dict(), indent=1)}", flush=True)
        barrier()

        trainer, state = build_and_resume(cfg, env, device, resume_from)
        engine, task, head = trainer.engine, trainer.task, trainer.task.head
        head_opt, head_sched = trainer.head_optimizer, trainer.head_scheduler
        global_batch = cfg.data.batch_size * env.world_size * cfg.optim.grad_accum_steps
        batches = build_train_loader(cfg.data, env.rank, env.world_size,
                                     start_batch=state.step * cfg.optim.grad_accum_steps)
        logger = MetricLogger(cfg.run_dir, env.is_main, global_batch)

        def save(st: ckpt.TrainState) -> str:
            return ckpt.save_checkpoint(cfg, env, st, engine, head, head_opt, head_sched)

        def evaluate_all(step: int) -> list[dict[str, float]]:
            """Every evaluation set's scores; the best of each so far is kept in state.best."""
            engine.eval()
            table = next(iter(head.sharded_parameters().values()))
            per_set = evaluate_sets(eval_sets, task, cfg.data, cfg.metrics, env.rank, env.world_size, device,
                                    trainer.model_input,
                                    on_embeddings=lambda spaces, lab: logger.log_embeddings(
                                        step, spaces, lab, table, head=head, protocol=eval_sets[0].protocol))
            engine.train()
            update_best(state.best, flatten(eval_sets, per_set))
            return per_set

        def with_best(values: dict[str, float]) -> dict[str, float]:  # what is logged: scores, best/ the best
            return {**values, **{f"best/{k}": v for k, v in state.best.items()}}

        def evaluate(step: int) -> dict[str, float]:
            return with_best(flatten(eval_sets, evaluate_all(step)))

        start_step = state.step
        train_t0 = time.time()
        state = train_loop(cfg, trainer, batches, state, logger, global_batch, env.is_main, save, evaluate,
                           stop_at_step or cfg.max_steps, control)
        train_s = time.time() - train_t0
        final: dict[str, float] = {}
        rows: list[str] = []
        if state.step >= cfg.max_steps and eval_sets:  # a preempted job leaves evaluation to its successor
            per_set = evaluate_all(state.step)
            final = flatten(eval_sets, per_set)
            logger.log(state.step, state.samples_seen, with_best(final), prefix="eval")
            if env.is_main:
                rows = write_eval_files(cfg.run_dir, eval_sets, per_set, state.step, ckpt.find_latest(cfg.run_dir))
                print("\n".join(rows), flush=True)
        if state.step >= cfg.max_steps and cfg.checkpoint.export and env.is_main:
            print(f"exported backbone and proxy table to {export(cfg.run_dir)}", flush=True)
        if state.step >= cfg.max_steps:  # once per run, by the job that finished it
            logger.log_hparams({**main_hparams(cfg.to_dict()), "global_batch": global_batch},
                               {**final, "last_train_loss": state.last_loss}, state.step)
        logger.close()
        summary = {"run_dir": os.path.abspath(cfg.run_dir), "tensorboard_dir": os.path.abspath(logger.tb_dir),
                   "checkpoint": ckpt.find_latest(cfg.run_dir), "step": state.step, "resumed_from_step": start_step,
                   "last_train_loss": state.last_loss,
                   "stop_signal": signal.Signals(state.stop_signal).name if state.stop_signal else "",
                   "world_size": env.world_size, "started_at": t0, "first_step_at": state.first_step_at,
                   "train_seconds": train_s, "total_seconds": time.time() - t0, "rows": rows,
                   "best": state.best, **final}
        if env.is_main:
            write_json_atomic(os.path.join(cfg.run_dir, "summary.json"), summary)
        return summary
    finally:
        if batches is not None:
            batches.close()
        control.close()
        if owns_group:
            destroy_distributed()
