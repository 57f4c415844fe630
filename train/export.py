"""Export a checkpoint for use elsewhere: a consolidated fp32 backbone timm loads, plus the full proxy table.

`python -m train.export RUN_DIR [--checkpoint STEP_DIR] [--out DIR]` writes into `<run_dir>/export/`:
  backbone.pth   the timm trunk's fp32 state dict:
                 `timm.create_model(model_name, checkpoint_path=".../backbone.pth", **timm_kwargs)` (both
                 from export.json; timm_kwargs holds num_classes=0)
  neck.pth       the Linear neck (trunk features -> embedding)
  head.pt        every sharded head parameter as one full table over all classes (rows in class-id
                 order, whatever world size wrote them) plus the replicated ones (CHEST's FC)
  export.json    model name and timm kwargs, embedding size, loss config, the step exported
  config.yaml    the run's whole config (transforms, normalisation, head): train.embed.load_embedder uses it
The ZeRO shards are consolidated with DeepSpeed's own zero_to_fp32 reader (stages 1-3), on CPU, in
one process: no GPU or process group needed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from model.backbone import timm_kwargs
from train import checkpoint as ckpt
from train.config import load_yaml, save_yaml
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


def full_head_tables(step_dir: str) -> dict[str, torch.Tensor]:
    """Every sharded head parameter with all classes' rows, and the replicated parameters."""
    parts = [
        (start, stop, torch.load(file, map_location="cpu", weights_only=False)["params"])
        for start, stop, file in head_shard_files(step_dir)
    ]
    expected = 0
    for start, stop, _ in parts:
        if start != expected:
            raise RuntimeError(
                f"{step_dir}/head: classes [{expected}, {start}) are missing; the checkpoint is "
                "incomplete, export an earlier one with --checkpoint"
            )
        expected = stop
    tables = {name: torch.cat([p[name]["value"] for _, _, p in parts]) for name in parts[0][2]}
    replicated = os.path.join(step_dir, "head", "replicated.pt")
    if os.path.exists(replicated):
        for name, saved in torch.load(replicated, map_location="cpu", weights_only=False).items():
            tables[name] = saved["value"]
    return tables


def export(run_dir: str, step_dir: str | None = None, out_dir: str | None = None) -> str:
    """Write the export of `step_dir` (a path or a step-N name; default the run's latest checkpoint); returns
    the folder."""
    step_dir = ckpt.resolve_step_dir(run_dir, step_dir)
    cfg = load_yaml(os.path.join(step_dir, "config.yaml"))
    out_dir = out_dir or os.path.join(run_dir, "export")
    os.makedirs(out_dir, exist_ok=True)
    weights = consolidated_backbone(step_dir, cfg.zero.stage)
    trunk = {k[len("trunk.") :]: v for k, v in weights.items() if k.startswith("trunk.")}
    neck = {k[len("neck.") :]: v for k, v in weights.items() if k.startswith("neck.")}
    torch.save(trunk, os.path.join(out_dir, "backbone.pth"))
    torch.save(neck, os.path.join(out_dir, "neck.pth"))
    torch.save(full_head_tables(step_dir), os.path.join(out_dir, "head.pt"))
    info = {
        "model_name": cfg.model.name,
        "timm_kwargs": timm_kwargs(cfg.model),
        "neck": cfg.model.neck,
        "embed_dim": cfg.model.embed_dim,
        "num_classes": cfg.data.num_classes,
        "loss": cfg.to_dict()["loss"],
        "step": ckpt.read_meta(step_dir)["step"],
        "checkpoint": os.path.abspath(step_dir),
    }
    save_yaml(cfg, os.path.join(out_dir, "config.yaml"))  # what load_embedder / train.evaluate --export rebuild from
    write_json_atomic(os.path.join(out_dir, "export.json"), info)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default=None, help="step-N or a checkpoint folder (default: the latest)")
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/export)")
    args = p.parse_args(argv)
    print(f"exported to {export(args.run_dir, args.checkpoint, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
