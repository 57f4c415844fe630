"""The head's optimizer (optim.head_optimizer): AdamW or SGD with momentum. Its row state (AdamW's two
moments, SGD's momentum) is saved with the table's rows, keyed by class range, and re-sliced on a resume
at another world size; the continued steps then equal those of the old layout (to float rounding)."""

from __future__ import annotations

import os

import pytest
import torch

from model.config import LossConfig
from model.distarc import DistArcHead
from train import checkpoint as ckpt
from train import head_state
from launch.recipes import get_recipe
from tests.numerics import assert_rel
from train.config import OptimConfig, save_yaml
from train.engine import build_head_optimizer

CLASSES, DIM = 11, 6


def _heads(world: int, optim: OptimConfig) -> list[tuple[DistArcHead, torch.optim.Optimizer, object]]:
    out = []
    for rank in range(world):
        head = DistArcHead(LossConfig(), CLASSES, DIM, rank, world)
        opt, sched = build_head_optimizer(head, optim, max_steps=20)
        out.append((head, opt, sched))
    return out


def _step(parts: list, grad: torch.Tensor) -> None:
    """One optimizer step of every shard with its rows of one whole-table gradient; for the lazy optimizers
    a row-sparse one of the rows whose gradient is not all zero (as a Partial-FC step's sampled rows)."""
    for head, opt, sched in parts:
        rows = grad[head.class_start : head.class_start + head.num_local].clone()
        if head.sparse_row_grads:
            kept = rows.abs().sum(1).nonzero()[:, 0]
            rows = torch.sparse_coo_tensor(kept[None], rows[kept], rows.shape, check_invariants=True)
        head.weight.grad = rows
        opt.step()
        sched.step()


def _table(parts: list) -> torch.Tensor:
    return torch.cat([head.weight.detach() for head, _, _ in parts])


@pytest.mark.parametrize(
    "kind, state_keys",
    [
        ("sgd", {"momentum_buffer"}),
        ("adamw", {"exp_avg", "exp_avg_sq", "step"}),
        ("lazy_sgd", {"momentum_buffer"}),
        ("lazy_adamw", {"exp_avg", "exp_avg_sq", "row_step", "step"}),  # per-row step counts ([C]) re-sliced too
    ],
)
@pytest.mark.parametrize("old, new", [(2, 3), (3, 1), (13, 2)])  # 13 ranks: 2 of them without classes
def test_row_state_is_resliced_and_the_steps_continue(tmp_path, kind: str, state_keys: set, old: int, new: int) -> None:
    optim = OptimConfig(head_optimizer=kind, head_lr=0.1, warmup_steps=0)
    grads = [torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    for step, grad in enumerate(grads):  # each step reaches a different subset of the rows (lazy: all others rest)
        grad[torch.arange(CLASSES) % 4 == step] = 0
    before = _heads(old, optim)
    for g in grads[:2]:
        _step(before, g)
    os.makedirs(tmp_path / "head")
    for head, opt, sched in before:
        head_state.save_head_shard(str(tmp_path / "head"), head, opt, sched)
    assert len(os.listdir(tmp_path / "head")) == min(old, CLASSES)  # ranks without classes write no file
    after = _heads(new, optim)
    for head, opt, sched in after:
        head_state.load_head(str(tmp_path), head, opt, sched)
        assert set(opt.state[head.weight]) == state_keys
    assert torch.equal(_table(after), _table(before))
    for g in grads[2:]:  # the momentum carried over: the same updates as without the resume
        _step(before, g)
        _step(after, g)
    # equal to float rounding: the fused kernels vectorise shards of other sizes differently (seen: 6e-8)
    assert_rel(_table(after), _table(before), "continued after the resume", 1e-6)
    moved = _table(before) - _table(_heads(old, optim))
    assert moved.abs().min() > 0  # every row was updated


def test_sgd_keeps_one_row_state_and_a_resume_with_the_other_optimizer_is_refused(tmp_path) -> None:
    ((head, opt, sched),) = _heads(1, OptimConfig(head_optimizer="sgd", head_momentum=0.5))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.5
    _step([(head, opt, sched)], torch.ones(CLASSES, DIM))
    assert opt.state[head.weight]["momentum_buffer"].shape == head.weight.shape  # one row per class, not two
    cfg = get_recipe("mnist_distarc")
    cfg.optim.head_optimizer = "sgd"
    save_yaml(cfg, str(tmp_path / "config.yaml"))
    cfg.optim.head_optimizer = "adamw"
    with pytest.raises(ValueError, match="holds the head's sgd state.*set optim.head_optimizer=sgd to resume"):
        ckpt.check_resumable(str(tmp_path), cfg)
    with pytest.raises(ValueError, match="optim.head_optimizer='lion' must be one of"):
        OptimConfig(head_optimizer="lion").validate()


def test_lazy_optimizers_are_refused_for_chest_and_across_a_resume(tmp_path) -> None:
    cfg = get_recipe("mnist_chest")
    cfg.optim.head_optimizer = "lazy_adamw"
    with pytest.raises(ValueError, match="regulariser reaches every proxy.*optim.head_optimizer=adamw"):
        cfg.validate()
    cfg = get_recipe("mnist_distarc")
    cfg.optim.head_optimizer = "adamw"
    save_yaml(cfg, str(tmp_path / "config.yaml"))
    cfg.optim.head_optimizer = "lazy_adamw"
    cfg.loss.sample_rate = 0.5
    cfg.validate()
    with pytest.raises(ValueError, match="holds the head's adamw state.*set optim.head_optimizer=adamw to resume"):
        ckpt.check_resumable(str(tmp_path), cfg)


@pytest.mark.parametrize("kind", ["fused", "capturable", "foreach"])
def test_a_restored_adam_step_lies_where_torchs_own_load_puts_it(kind: str) -> None:
    """A fused (or capturable) AdamW reads its step on the parameter's device: a resumed head on CUDA failed its
    first step with the step left on the CPU. Meta tensors stand in for a device other than the CPU (a fused
    group's step follows the parameter alike); torch's own load_state_dict is the reference."""
    device = "cpu" if kind == "fused" else "meta"
    param = torch.nn.Parameter(torch.zeros(3, 2, device=device))
    opt = torch.optim.AdamW([param], **{kind: True})
    moments = {"exp_avg": torch.ones(3, 2), "exp_avg_sq": torch.ones(3, 2)}
    head_state.restore_param(param, opt, torch.ones(3, 2), moments, 7.0)
    ours = opt.state[param]["step"]
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2, device=device))], **{kind: True})
    saved = reference.state_dict()
    saved["state"] = {0: {"step": torch.tensor(7.0), **moments}}
    reference.load_state_dict(saved)
    theirs = next(iter(reference.state.values()))["step"]
    assert (ours.device, ours.dtype) == (theirs.device, theirs.dtype)
    assert device == "meta" or float(ours) == float(theirs) == 7.0  # a meta tensor holds no value
