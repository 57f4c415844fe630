"""Resume a DeepSpeed engine checkpoint at a different world size (DeepSpeed universal checkpoints).

A ZeRO checkpoint is partitioned by data-parallel rank and refuses another world size. For a
resume at W2 != W1 the step folder's `engine/` is converted once, by rank 0, into
`engine_universal/` (full, unpartitioned fp32 weights, Adam moments and step per parameter) with
DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`), and every rank loads it into
an engine built with `"checkpoint": {"load_universal": true}` (docs/infra-lessons.md 0.4, 2.3). The head
is re-sliced by class range separately (train/checkpoint.py).

Three gaps of DeepSpeed 0.19.8's universal load are closed here (each measured: weights, moments,
steps, param groups and buffers come back bit-identical for ZeRO-1/2/3, W 4->2, 2->4, 2->1, 4->3):
  - module buffers (BatchNorm statistics) are not restored: copied back from the model states;
  - ZeRO-3 copies param group 0's hyper-parameters into every group (the no-decay group would get
    weight decay): each group's saved values are put back;
  - ZeRO-3 shares one AdamW `step` tensor between groups, which then advances twice per step:
    each group gets its own copy.
Non-Megatron clients lack `universal_checkpoint_info`; the converter injects it
(`inject_missing_state`).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import time
from typing import Any

import torch

from common.files import write_text_atomic

ENGINE_TAG = "engine"
UNIVERSAL_TAG = "engine_universal"


def needs_universal(step_dir: str, engine_changed: bool) -> bool:
    """Whether loading `step_dir` into an engine that differs from the one that wrote it (`engine_changed`:
    another world size, or zero.bf16 switched; train.checkpoint.engine_changes) needs the universal
    conversion: for a partitioned optimizer state (ZeRO >= 1, and bf16 at stage 0: `*optim_states.pt` files
    per rank; DeepSpeed's plain load looks for files named by rank and precision). Plain fp32 ZeRO-0 keeps
    the whole optimizer state in the model states file and loads at any world size as it is (DeepSpeed's
    converter finds no optimizer files there and fails)."""
    return engine_changed and bool(glob.glob(os.path.join(step_dir, ENGINE_TAG, "*optim_states.pt")))


def convert_to_universal(step_dir: str) -> float:
    """Write `step_dir/engine_universal` from `step_dir/engine` (one process only); returns seconds.

    Kept when already complete; written to a temporary sibling and renamed, so a conversion
    killed half-way is simply redone.
    """
    from deepspeed.checkpoint import ds_to_universal

    dst = os.path.join(step_dir, UNIVERSAL_TAG)
    if os.path.exists(os.path.join(dst, "zero", "optimizer_state.pt")):
        return 0.0
    # this process's own temp folder: two converters of one step (two jobs on one run dir) must not share one;
    # a killed converter's is removed once it is an hour old (a conversion takes minutes)
    for stale in glob.glob(os.path.join(step_dir, f".tmp-{UNIVERSAL_TAG}*")):
        if time.time() - os.path.getmtime(stale) > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(step_dir, f".tmp-{UNIVERSAL_TAG}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=os.path.join(step_dir, ENGINE_TAG),
        output_folder=tmp,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    t0 = time.time()
    ds_to_universal.main(args)
    if os.path.exists(os.path.join(dst, "zero", "optimizer_state.pt")):  # another converter finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return time.time() - t0
    shutil.rmtree(dst, ignore_errors=True)  # a killed rename's leftovers only: a complete one was kept above
    os.replace(tmp, dst)
    # DeepSpeed wrote the temp folder's name into latest_universal; name the real one (a tag-less load reads it)
    write_text_atomic(os.path.join(step_dir, "latest_universal"), UNIVERSAL_TAG)
    return time.time() - t0


def load_universal(engine: Any, step_dir: str) -> None:
    """Every rank: restore `step_dir/engine_universal` into an engine built with load_universal=True."""
    if not engine.load_universal_checkpoint():
        raise RuntimeError('the engine must be built with config["checkpoint"] = {"load_universal": True}')
    path, _ = engine.load_checkpoint(
        step_dir, tag=UNIVERSAL_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed found no universal checkpoint under {step_dir}/{UNIVERSAL_TAG}")
    folder = os.path.join(step_dir, UNIVERSAL_TAG)
    _restore_buffers(engine, folder)
    _restore_param_group_hparams(engine, folder)
    _own_placed_adam_steps(engine)


def _restore_buffers(engine: Any, folder: str) -> None:
    files = sorted(glob.glob(os.path.join(folder, "*model_states.pt")))
    if not files:
        raise FileNotFoundError(f"no *model_states.pt under {folder}")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]  # buffers are replicated
    # (BatchNorm's running statistics are rank 0's: what evaluation uses, train.dist.broadcast_running_stats_)
    with torch.no_grad():
        for name, buf in engine.module.named_buffers():
            if name in saved:
                buf.copy_(saved[name].to(device=buf.device, dtype=buf.dtype))


def _restore_param_group_hparams(engine: Any, folder: str) -> None:
    saved = torch.load(os.path.join(folder, "zero", "optimizer_state.pt"), map_location="cpu", weights_only=False)[
        "param_groups"
    ]
    groups = engine.optimizer.optimizer.param_groups  # the client AdamW inside the ZeRO wrapper
    if len(saved) != len(groups):
        raise RuntimeError(f"{folder} holds {len(saved)} optimizer param groups, the engine has {len(groups)}")
    for group, values in zip(groups, saved):
        group.update({k: v for k, v in values.items() if k != "params"})


def _own_placed_adam_steps(engine: Any) -> None:
    """Each parameter its own `step` tensor (ZeRO-3 loads one for all), placed as torch's own
    load_state_dict would (`placed_step`: DeepSpeed's universal load leaves it on the CPU)."""
    optimizer = engine.optimizer.optimizer
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    seen: set[int] = set()
    for param, state in optimizer.state.items():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                step = step.clone()
            state["step"] = placed_step(step, param, group_of.get(id(param), {}))
            seen.add(id(state["step"]))


def placed_step(step: torch.Tensor | float, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """An Adam-style optimizer's `step` for `param` where torch keeps it (Optimizer.load_state_dict's rule): on
    the parameter's device in fp32 for a fused or capturable group, whose kernels read it there (fused AdamW
    on CUDA fails on a CPU step: "Expected all tensors to be on the same device"), else a CPU tensor."""
    step = step if torch.is_tensor(step) else torch.tensor(float(step))
    if group.get("fused") or group.get("capturable"):
        return step.to(dtype=torch.float32, device=param.device)
    return step
