"""The head's part of a checkpoint: `head/classes-A-B.pt` per rank (its rows of every sharded parameter with
their optimizer state, keyed by class range, so another world size re-slices them), `head/replicated.pt`
(CHEST's shared FC), and the schedule's position; written and read by train/checkpoint.py."""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import torch

from model.proxies import ShardedHead
from train.elastic import placed_step

# optimizer state kept per parameter row: AdamW's two moments, SGD's momentum (optim.head_optimizer), and the
# lazy AdamW's per-row step count ([C], train/lazy_rows.py)
MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "row_step")


def param_state(param: torch.nn.Parameter, opt: torch.optim.Optimizer) -> dict[str, Any]:
    st = opt.state.get(param, {})
    out: dict[str, Any] = {"value": param.detach().cpu()}
    for key in MOMENTS:
        out[key] = st[key].cpu() if st.get(key) is not None else None
    out["step"] = float(st["step"]) if "step" in st else 0.0
    return out


def head_state(head: ShardedHead, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    """This rank's rows of every sharded parameter, with their AdamW moments, keyed by class range."""
    return {
        "class_start": head.class_start,
        "num_local": head.num_local,
        "scheduler": sched.state_dict(),
        "params": {name: param_state(p, opt) for name, p in head.sharded_parameters().items()},
    }


def save_head_shard(folder: str, head: ShardedHead, opt: torch.optim.Optimizer, sched: Any) -> None:
    """This rank's rows as `folder/classes-A-B.pt`. Ranks past the last class (fewer classes than ranks)
    write nothing: they all wrote the same classes-C-C.pt at once."""
    start, stop = head.class_start, head.class_start + head.num_local
    if stop > start:
        torch.save(head_state(head, opt, sched), os.path.join(folder, f"classes-{start:09d}-{stop:09d}.pt"))


def save_replicated(path: str, head: ShardedHead, opt: torch.optim.Optimizer) -> None:
    params = head.replicated_parameters()
    if params:
        torch.save({name: param_state(p, opt) for name, p in params.items()}, os.path.join(path, "replicated.pt"))


def restore_param(
    param: torch.nn.Parameter,
    opt: torch.optim.Optimizer,
    value: torch.Tensor,
    moments: dict[str, torch.Tensor],
    step: float,
) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.device))
    state: dict[str, Any] = {k: v.to(param.device) for k, v in moments.items()}
    if step > 0:  # AdamW counts its steps; SGD keeps only its momentum
        group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
        state["step"] = placed_step(step, param, group)
    if state:
        opt.state[param] = state


def head_shard_files(path: str) -> list[tuple[int, int, str]]:
    """(first class, end class, file) of every head shard of checkpoint `path`, in class order."""
    found = []
    for file in glob.glob(os.path.join(path, "head", "classes-*.pt")):
        start, stop = (int(v) for v in re.findall(r"(\d+)", os.path.basename(file))[:2])
        found.append((start, stop, file))
    return sorted(found)


def load_head(path: str, head: ShardedHead, opt: torch.optim.Optimizer, sched: Any) -> None:
    """Copy rows [class_start, class_start + num_local) out of whichever saved ranges overlap them."""
    lo, hi = head.class_start, head.class_start + head.num_local
    targets = head.sharded_parameters()
    values = {n: torch.empty_like(p.data, device="cpu") for n, p in targets.items()}
    moments: dict[str, dict[str, torch.Tensor]] = {n: {} for n in targets}  # the kinds the checkpoint holds
    covered, opt_step, sched_state = 0, 0.0, None
    for a, b, file in head_shard_files(path):
        if b <= lo or a >= hi:
            continue
        part = torch.load(file, weights_only=False)
        s, e = max(a, lo), min(b, hi)
        for name in targets:
            saved = part["params"][name]
            values[name][s - lo : e - lo] = saved["value"][s - a : e - a]
            for key in MOMENTS:
                if saved.get(key) is not None:
                    rows = moments[name].setdefault(key, saved[key].new_zeros((hi - lo, *saved[key].shape[1:])))
                    rows[s - lo : e - lo] = saved[key][s - a : e - a]
            opt_step = saved["step"]
        covered += e - s
        sched_state = part["scheduler"]
    if covered != hi - lo:
        raise RuntimeError(f"checkpoint {path}/head covers {covered} of classes [{lo}, {hi}): it is incomplete")
    for name, param in targets.items():
        restore_param(param, opt, values[name], moments[name], opt_step)
    replicated = head.replicated_parameters()
    if replicated:
        saved_repl = torch.load(os.path.join(path, "head", "replicated.pt"), weights_only=False)
        for name, param in replicated.items():
            st = saved_repl[name]
            restore_param(param, opt, st["value"], {k: st[k] for k in MOMENTS if st.get(k) is not None}, st["step"])
    if sched_state is None:  # a rank with no classes (C < P) still needs the schedule's position
        sched_state = torch.load(head_shard_files(path)[0][2], weights_only=False)["scheduler"]
    sched.load_state_dict(sched_state)
    # The schedule's position and base rates (one per param group: CHEST's FC has its own) come from the
    # checkpoint, as DeepSpeed restores the backbone's: a resume with another optim.lr / head_lr changed the
    # head's rate alone (train.main warns about such changes). load_state_dict sets no rate in the optimizer.
    if len(sched.base_lrs) != len(opt.param_groups):
        sched.base_lrs = [group["initial_lr"] for group in opt.param_groups]
    for group, base in zip(opt.param_groups, sched.base_lrs):
        group["initial_lr"] = base
    rates_from_schedule(sched)


def rates_from_schedule(sched: Any) -> None:
    """Each param group's rate at the restored step: its saved base rate x this config's schedule (a LambdaLR
    keeps no shape: optim.warmup_steps, optim.min_lr_ratio and max_steps are this run's). For the backbone as
    for the head: DeepSpeed put back the rate the old schedule gave, one step out of line with the head's after a
    resume that changed them. load_state_dict sets no rate in the optimizer."""
    for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]  # what get_last_lr() reports
