"""Export a checkpoint for use elsewhere: a consolidated fp32 backbone timm loads, plus the full proxy table.

`python -m train.export RUN_DIR [--checkpoint STEP_DIR] [--out DIR]` writes into `<run_dir>/export/`:
  backbone.pth   the timm trunk's fp32 state dict:
                 `timm.create_model(model_name, checkpoint_path=".../backbone.pth", **timm_kwargs)` (both
                 from export.json; timm_kwargs holds num_classes=0)
  neck.pth       the Linear neck (trunk features -> embedding)
  head.pt        every sharded head parameter as one full table over all classes, row j = class j whatever
                 world size wrote them (CHEST's shuffled rows put back: "head_rows": "class_id" in
                 export.json), plus the replicated ones (CHEST's FC); DistArc: each class's sphere "radii"
  export.json    model name and timm kwargs, embedding size, the input (image_size, in_chans, per-channel
                 mean/std of pixels in [0, 1]), loss config, the step exported
  config.yaml    the run's whole config (transforms, normalisation, head): train.embed.load_embedder uses it
The ZeRO shards are consolidated with DeepSpeed's own zero_to_fp32 reader (stages 1-3), on CPU, in
one process: no GPU or process group needed. The folder is written beside the target and renamed into
place, so a failed export leaves the previous one whole.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from data.transforms import normalisation
from model.backbone import timm_kwargs
from model.distarc import sphere_radii
from model.proxies import class_permutation
from train import checkpoint as ckpt
from train.config import RunConfig, load_yaml, save_yaml
from train.head_state import head_shard_files
from common.files import write_json_atomic


def consolidated_backbone(step_dir: str, stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole backbone (trunk.* and neck.*) from a DeepSpeed engine checkpoint."""
    engine_dir = os.path.join(step_dir, ckpt.ENGINE_TAG)
    if stage == 0:  # no partitioned optimizer: the module state is the (fp32) model itself
        state = torch.load(
            os.path.join(engine_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False
        )
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(step_dir, tag=ckpt.ENGINE_TAG))


def full_head_tables(step_dir: str, num_classes: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every sharded head parameter with all classes' rows (in the head's row order) and the replicated
    parameters; and the names of the sharded ones (the class tables)."""
    parts = [
        (start, stop, torch.load(file, map_location="cpu", weights_only=False)["params"])
        for start, stop, file in head_shard_files(step_dir)
    ]
    expected = 0
    for start, stop, _ in [*parts, (num_classes, num_classes, None)]:
        if start != expected:
            raise RuntimeError(
                f"{step_dir}/head: classes [{expected}, {start}) are missing; the checkpoint is "
                "incomplete, export an earlier one with --checkpoint"
            )
        expected = stop
    tables = {name: torch.cat([p[name]["value"] for _, _, p in parts]) for name in parts[0][2]}
    class_tables = sorted(tables)
    replicated = os.path.join(step_dir, "head", "replicated.pt")
    if os.path.exists(replicated):
        for name, saved in torch.load(replicated, map_location="cpu", weights_only=False).items():
            tables[name] = saved["value"]
    return tables, class_tables


def class_rows(cfg: RunConfig) -> torch.Tensor | None:
    """label -> row of the head's class tables where the head shuffles them (model.chest.ChestHead with
    loss.chest.permute_classes), else None (row j holds class j)."""
    loss = cfg.loss
    if loss.name in ("chest", "softtriple") and loss.chest.permute_classes:
        return class_permutation(cfg.data.num_classes, loss.init_seed)
    return None


def export(run_dir: str, step_dir: str | None = None, out_dir: str | None = None) -> str:
    """Write the export of `step_dir` (a path or a step-N name; default the run's latest checkpoint); returns
    the folder."""
    step_dir = ckpt.resolve_step_dir(run_dir, step_dir)
    cfg = load_yaml(os.path.join(step_dir, "config.yaml"))
    out_dir = out_dir or os.path.join(run_dir, "export")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--out {out_dir} is a file; give a folder (default: <run_dir>/export)")
    staging = f"{out_dir.rstrip(os.sep)}.writing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        _write(step_dir, cfg, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = f"{out_dir.rstrip(os.sep)}.replaced-{os.getpid()}"
    if os.path.isdir(out_dir):
        os.rename(out_dir, replaced)
    os.rename(staging, out_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    return out_dir


def _write(step_dir: str, cfg: RunConfig, staging: str) -> None:
    """The export's files, into `staging`."""
    weights = consolidated_backbone(step_dir, cfg.zero.stage)
    trunk = {k[len("trunk.") :]: v for k, v in weights.items() if k.startswith("trunk.")}
    neck = {k[len("neck.") :]: v for k, v in weights.items() if k.startswith("neck.")}
    torch.save(trunk, os.path.join(staging, "backbone.pth"))
    torch.save(neck, os.path.join(staging, "neck.pth"))
    head, class_tables = full_head_tables(step_dir, cfg.data.num_classes)
    rows = class_rows(cfg)
    if rows is not None:  # CHEST's shuffled rows back in class order: row j = class j
        for name in class_tables:
            head[name] = head[name][rows]
    if cfg.loss.name == "distarc":  # the sphere radius of each class: the predictive measure from the export alone
        loss = cfg.loss
        head["radii"] = sphere_radii(
            torch.arange(cfg.data.num_classes), loss.radius_start, loss.radius_gap, loss.num_spheres
        )
    torch.save(head, os.path.join(staging, "head.pt"))
    mean, std = normalisation(cfg.data)
    info = {
        "model_name": cfg.model.name,
        "timm_kwargs": timm_kwargs(cfg.model),
        "neck": cfg.model.neck,
        "embed_dim": cfg.model.embed_dim,
        "input": {"image_size": cfg.data.image_size, "in_chans": cfg.data.in_chans, "mean": mean, "std": std},
        "num_classes": cfg.data.num_classes,
        "head_rows": "class_id",
        "class_tables": class_tables,
        "loss": cfg.to_dict()["loss"],
        "step": ckpt.read_meta(step_dir)["step"],
        "checkpoint": os.path.abspath(step_dir),
    }
    save_yaml(cfg, os.path.join(staging, "config.yaml"))  # what load_embedder / train.evaluate --export rebuild from
    write_json_atomic(os.path.join(staging, "export.json"), info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default=None, help="step-N or a checkpoint folder (default: the latest)")
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/export)")
    args = p.parse_args(argv)
    try:
        print(f"exported to {export(args.run_dir, args.checkpoint, args.out)}")
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
