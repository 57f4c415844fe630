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
                 mean/std of pixels in [0, 1], and evaluation's resize and crop: data.transforms.
                 eval_preprocessing), loss config, the step exported
  config.yaml    the run's whole config (transforms, normalisation, head): train.embed.load_embedder uses it
The ZeRO shards are consolidated with DeepSpeed's own zero_to_fp32 reader (stages 1-3), on CPU, in
one process: no GPU or process group needed; a bf16 stage-1 checkpoint (DeepSpeed's BF16_Optimizer files, which
that reader refuses) through the universal conversion instead, kept in the checkpoint as `engine_universal/`
(~12 bytes a parameter; the checkpoint folder must be writable). The folder is written beside the target and
renamed into place, so a failed export leaves the previous one whole; --out replaces only an earlier export.
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import shutil
import socket
import sys
from typing import Any

import torch

from data.transforms import eval_preprocessing, normalisation
from model.backbone import timm_kwargs
from model.config import has_shared_fc
from model.distarc import sphere_radii
from model.proxies import class_permutation
from train import checkpoint as ckpt
from train.config import RunConfig, load_yaml, save_yaml
from train.elastic import UNIVERSAL_TAG, convert_to_universal
from train.head_state import head_shard_files
from common.files import write_json_atomic


# what an export folder holds: a folder with anything else is not replaced by --out
EXPORT_FILES = frozenset({"backbone.pth", "neck.pth", "head.pt", "export.json", "config.yaml"})
EARLIER = "export or evaluate an earlier checkpoint (--checkpoint step-M)"


def load_saved(path: str, fix: str = EARLIER, weights_only: bool = False) -> Any:
    """torch.load on the CPU that names the file and the fix when it is missing or cannot be read (cut short by
    a full disk or an interrupted copy): torch's own message names neither."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - zip reader, unpickler and EOF errors for a damaged file
        raise ValueError(
            f"{path} cannot be read ({type(err).__name__}: {err}); it is damaged or cut short: {fix}"
        ) from err


def check_engine_files(step_dir: str, stage: int) -> None:
    """Every rank's engine files are there. DeepSpeed's reader counts the optimizer files, but at ZeRO-3 takes
    the module buffers (BatchNorm statistics) from whichever model-states file it lists first: without rank 0's
    it exported rank 1's silently."""
    world = int(ckpt.read_meta(step_dir)["world_size"])
    engine_dir = os.path.join(step_dir, ckpt.ENGINE_TAG)
    names = (
        [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
        if stage == 3
        else ["mp_rank_00_model_states.pt"]
    )
    missing = [n for n in names if not os.path.isfile(os.path.join(engine_dir, n))]
    if missing:
        raise FileNotFoundError(
            f"{engine_dir} lacks {', '.join(missing)} (written by {world} ranks): the checkpoint is incomplete; "
            f"{EARLIER}"
        )


def consolidated_backbone(step_dir: str, stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole backbone (trunk.* and neck.*) from a DeepSpeed engine checkpoint, each tensor
    its own storage (DeepSpeed's ZeRO-1/2 reader returns views of one flat buffer: a torch.save of a few of them
    wrote the whole model)."""
    engine_dir = os.path.join(step_dir, ckpt.ENGINE_TAG)
    check_engine_files(step_dir, stage)
    if stage == 0:  # no partitioned optimizer: the module state is the (fp32) model itself
        state = load_saved(os.path.join(engine_dir, "mp_rank_00_model_states.pt"))
        # fp32 like the ZeRO reader's weights; integer buffers (BatchNorm's num_batches_tracked) keep their type
        return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in state["module"].items()}
    if stage == 1 and glob.glob(os.path.join(engine_dir, "bf16_zero_pp_rank_*optim_states.pt")):
        return universal_backbone(step_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(step_dir, tag=ckpt.ENGINE_TAG)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # a damaged file, named by nobody
        raise ValueError(f"{engine_dir} cannot be read ({err}): a file is damaged or cut short; {EARLIER}") from err
    return {k: v.clone() for k, v in weights.items()}


def universal_backbone(step_dir: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a bf16 ZeRO-1 checkpoint: DeepSpeed's BF16_Optimizer writes bf16_zero_pp_rank_* files
    that its zero_to_fp32 reader refuses ("is not a zero checkpoint": every bf16 stage-1 run failed at its end),
    so they come from the universal conversion (kept in the checkpoint, as a resume at another size keeps it);
    buffers from the module state, in their own dtype."""
    convert_to_universal(step_dir)
    module = load_saved(os.path.join(step_dir, ckpt.ENGINE_TAG, "mp_rank_00_model_states.pt"))["module"]
    weights = {}
    for name, value in module.items():
        master = os.path.join(step_dir, UNIVERSAL_TAG, "zero", name, "fp32.pt")
        floating = value.is_floating_point() and os.path.isfile(master)
        weights[name] = (load_saved(master)["param"] if floating else value).clone()
    return weights


def full_head_tables(
    step_dir: str, num_classes: int, replicated_needed: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every sharded head parameter with all classes' rows (in the head's row order) and the replicated
    parameters (`replicated_needed`: the head has some, e.g. CHEST's shared FC, so head/replicated.pt must be
    there); and the names of the sharded ones (the class tables)."""
    parts = [(start, stop, load_saved(file)["params"]) for start, stop, file in head_shard_files(step_dir)]
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
    if replicated_needed and not os.path.exists(replicated):  # exported without it, the FC was missing at embed time
        raise FileNotFoundError(
            f"{replicated} (the head's shared FC) is missing: the checkpoint is incomplete; {EARLIER}"
        )
    if os.path.exists(replicated):
        for name, saved in load_saved(replicated).items():
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
    check_replaceable(out_dir)
    remove_dead_staging(out_dir)
    staging = f"{out_dir.rstrip(os.sep)}.writing-{process_tag()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        _write(step_dir, cfg, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = f"{out_dir.rstrip(os.sep)}.replaced-{process_tag()}"
    if os.path.isdir(out_dir):
        os.rename(out_dir, replaced)
    os.rename(staging, out_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    return out_dir


def process_tag() -> str:
    """HOST-PID: what names an export's staging folders (a PID alone says nothing about another node's export
    writing into the same shared folder)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_dead_staging(out_dir: str) -> None:
    """Remove what an export killed on this host left beside `out_dir`: its half-written `<out>.writing-HOST-PID`,
    and a `<out>.replaced-HOST-PID` (the export before it) once `out_dir` exists again; a live process's, and
    other hosts' (whose processes cannot be seen from here), are left alone."""
    base, host = out_dir.rstrip(os.sep), socket.gethostname()
    for kind in ("writing", "replaced"):
        prefix = f"{base}.{kind}-{host}-"
        for path in glob.glob(glob.escape(prefix) + "*"):
            pid = path[len(prefix) :]  # digits only: host "vm" must not take host "vm-2"'s "vm-2-PID"
            if not pid.isdigit() or process_alive(int(pid)):
                continue
            if kind == "writing" or os.path.isdir(out_dir):
                shutil.rmtree(path, ignore_errors=True)
            else:  # killed between its two renames: the previous export goes back in place
                os.rename(path, out_dir)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def check_replaceable(out_dir: str) -> None:
    """--out may name a new folder, an empty one or an earlier export, which the new one replaces whole. Any
    other folder was deleted with it: a run folder, a folder of other models, run_root itself."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--out {out_dir} is a file; give a folder (default: <run_dir>/export)")
    others = sorted(set(os.listdir(out_dir)) - EXPORT_FILES) if os.path.isdir(out_dir) else []
    if others:
        raise FileExistsError(
            f"--out {out_dir} holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}, which an export "
            "does not write: it would be deleted with the folder. Give a new or empty folder (or an earlier export's)"
        )


def _write(step_dir: str, cfg: RunConfig, staging: str) -> None:
    """The export's files, into `staging`."""
    weights = consolidated_backbone(step_dir, cfg.zero.stage)
    trunk = {k[len("trunk.") :]: v for k, v in weights.items() if k.startswith("trunk.")}
    neck = {k[len("neck.") :]: v for k, v in weights.items() if k.startswith("neck.")}
    torch.save(trunk, os.path.join(staging, "backbone.pth"))
    torch.save(neck, os.path.join(staging, "neck.pth"))
    head, class_tables = full_head_tables(step_dir, cfg.data.num_classes, has_shared_fc(cfg.loss))
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
        "input": {
            "image_size": cfg.data.image_size,
            "in_chans": cfg.data.in_chans,
            "mean": mean,
            "std": std,
            **eval_preprocessing(cfg.data),  # resize and crop of evaluation, before pixels / 255 -> mean/std
        },
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
