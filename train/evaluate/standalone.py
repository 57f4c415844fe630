"""A trained run loaded for evaluation or embedding, at any number of ranks, without DeepSpeed's engine.

Sources: a checkpoint `step-N/` (the ZeRO shards consolidated by DeepSpeed's own fp32 reader, the head
table joined from its class-range files) or the run's export (`export/`: backbone.pth, neck.pth,
head.pt, config.yaml). Either way every rank builds the embedding network whole and takes its own
class slice of the head, so the world size of the evaluation need not be the one of training.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from data.transforms import InputNormaliser
from model.backbone import EmbeddingModel, build_backbone
from model.config import has_shared_fc
from model.proxies import ShardedHead
from model.task import MetricLearningTask, build_head
from train import checkpoint as ckpt
from train.config import RunConfig, load_yaml
from train.dist import barrier, destroy_distributed, env_from_environ, init_distributed
from train.evaluate.protocols import evaluate_sets, flatten
from train.evaluate.report import write_eval_files
from train.evaluate.sets import resolve_eval_sets
from train.export import class_rows, consolidated_backbone, full_head_tables, load_saved
from train.overrides import apply_overrides


@dataclasses.dataclass
class LoadedRun:
    """What evaluation needs from a run: its config, the weights, and where they came from."""

    cfg: RunConfig
    source: str  # the step-N folder or the export folder
    step: int
    backbone: dict[str, torch.Tensor]  # trunk.* and neck.* (fp32)
    head: dict[str, torch.Tensor]  # every head parameter, sharded ones with all classes' rows


def source_dir(run_dir: str, checkpoint: str | None = None, use_export: bool = False) -> str:
    """The folder weights come from: a step-N checkpoint (default the latest) or the export folder."""
    if not use_export:
        return ckpt.resolve_step_dir(run_dir, checkpoint)
    source = os.path.join(run_dir, "export") if os.path.isdir(os.path.join(run_dir, "export")) else run_dir
    if not os.path.isfile(os.path.join(source, "config.yaml")):
        raise FileNotFoundError(
            f"{os.path.join(source, 'config.yaml')} does not exist: not an export folder "
            f"(python -m train.export {run_dir} writes one)"
        )
    return source


def config_path(run_dir: str, checkpoint: str | None = None, use_export: bool = False) -> str:
    """The config.yaml saved with those weights."""
    return os.path.join(source_dir(run_dir, checkpoint, use_export), "config.yaml")


def load_run(
    run_dir: str, checkpoint: str | None = None, use_export: bool = False, overrides: list[str] | None = None
) -> LoadedRun:
    """The run's config (with `key=value` overrides applied) and its weights.

    Raises before any weight is read when the overrides change the saved model or class table.
    """
    source = source_dir(run_dir, checkpoint, use_export)
    saved = load_yaml(os.path.join(source, "config.yaml"))
    cfg = apply_overrides(saved, list(overrides or []))
    cfg.validate()
    fix = "drop the model.* / loss.* / data.num_classes overrides: evaluation takes the model and its head from the run"
    ckpt.check_compatible(source, cfg, fix=fix)
    # every loss setting shapes the head's predictions (radii, curvature, spaces...); only the chunk is free
    now = _dotted(dataclasses.asdict(dataclasses.replace(cfg.loss, class_chunk=saved.loss.class_chunk)))
    was = _dotted(dataclasses.asdict(saved.loss))
    changed = [f"loss.{key}: {was[key]!r} -> {value!r}" for key, value in now.items() if was.get(key) != value]
    if changed:
        raise ValueError(f"overrides change the run's head ({'; '.join(changed)}); {fix}")
    if use_export:
        fix = f"export the run again (python -m train.export {run_dir}) or use its checkpoint (drop --export)"
        weights = load_saved(os.path.join(source, "backbone.pth"), fix, weights_only=True)
        neck = load_saved(os.path.join(source, "neck.pth"), fix, weights_only=True)
        backbone = {**{f"trunk.{k}": v for k, v in weights.items()}, **{f"neck.{k}": v for k, v in neck.items()}}
        head = load_saved(os.path.join(source, "head.pt"), fix, weights_only=True)
        with open(os.path.join(source, "export.json")) as f:
            info = json.load(f)
        step, rows = int(info["step"]), class_rows(saved)
        # row j = class j since 2026-12-07 ("head_rows"); older exports hold the head's own (shuffled) rows
        if info.get("head_rows") == "class_id" and rows is not None:
            for name in info["class_tables"]:
                head[name] = head[name][torch.argsort(rows)]
    else:
        backbone = consolidated_backbone(source, saved.zero.stage)
        head, _ = full_head_tables(source, saved.data.num_classes, has_shared_fc(saved.loss))
        step = int(ckpt.read_meta(source)["step"])
    return LoadedRun(cfg, source, step, backbone, head)


def _dotted(values: dict, prefix: str = "") -> dict:
    """{"chest": {"curvature": 0.5}} -> {"chest.curvature": 0.5}."""
    out: dict = {}
    for key, value in values.items():
        out.update(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def build_embedding_model(run: LoadedRun, device: torch.device) -> EmbeddingModel:
    """The trained embedding network (eval mode, fp32, on `device`); the trunk is never re-downloaded."""
    model = build_backbone(
        dataclasses.replace(run.cfg.model, checkpoint_path="", drop_path_rate=0.0, grad_checkpointing=False)
    )
    model.load_state_dict(run.backbone, strict=True)
    return model.to(device).eval()


def build_sharded_head(run: LoadedRun, rank: int, world_size: int, device: torch.device) -> ShardedHead:
    """This rank's class slice of the trained head (replicated parameters whole)."""
    cfg = run.cfg
    head = build_head(cfg.loss, cfg.data.num_classes, cfg.model.embed_dim, rank, world_size)
    lo, n = head.class_start, head.num_local
    with torch.no_grad():
        for name, param in head.sharded_parameters().items():
            param.copy_(run.head[name][lo : lo + n])
        for name, param in head.replicated_parameters().items():
            param.copy_(run.head[name])
    return head.to(device).eval()


def build_task(run: LoadedRun, rank: int, world_size: int, device: torch.device) -> MetricLearningTask:
    return MetricLearningTask(build_embedding_model(run, device), build_sharded_head(run, rank, world_size, device))


def evaluate_run(
    run_dir: str,
    checkpoint: str | None = None,
    use_export: bool = False,
    splits: list[str] | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Evaluate on this process's rank (the group is started here if needed); returns, on every rank,
    {"rows", "metrics" (flat), "step", "source"}; rank 0 writes the files."""
    env = env_from_environ()
    run = load_run(run_dir, checkpoint, use_export, overrides)  # config checks first, then the weights
    sets = resolve_eval_sets(run.cfg.data, run.cfg.metrics, splits)
    if not sets:
        raise ValueError(
            f"{run_dir}: nothing to evaluate (data.eval_split is empty and metrics.eval_sets unset); "
            "give --split NAME or metrics.eval_sets=ROOT[:SPLIT]"
        )
    device, owns_group = init_distributed(env)
    try:
        task = build_task(run, env.rank, env.world_size, device)
        normaliser = InputNormaliser(run.cfg.data)
        per_set = evaluate_sets(
            sets,
            task,
            run.cfg.data,
            run.cfg.metrics,
            env.rank,
            env.world_size,
            device,
            lambda images: normaliser(images, device, torch.float32),
        )
        assert per_set is not None  # None only when a `stop` asks for it
        values = flatten(sets, per_set)
        rows: list[str] = []
        if env.is_main:
            rows = write_eval_files(run_dir, sets, per_set, run.step, run.source)
            _log_tensorboard(run_dir, run.step, values)
        barrier()
        return {"rows": rows, "metrics": values, "step": run.step, "source": run.source}
    finally:
        if owns_group:
            destroy_distributed()


def _log_tensorboard(run_dir: str, step: int, values: dict[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(os.path.join(run_dir, "tb")) as writer:
        for key, value in values.items():
            writer.add_scalar(f"evaluate/{key}", value, step)
