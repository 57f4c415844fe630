"""The lazy row optimizers (optim.head_optimizer=lazy_adamw / lazy_sgd, train/lazy_rows.py) against independent
references: torch.optim.AdamW / SGD on a dense gradient (every row touched), and one torch optimizer per row,
stepped only when the row is in the step's sparse gradient; and the sampled DistArc head's row-sparse gradient
against its dense one."""

from __future__ import annotations

import pytest
import torch

from model.config import LossConfig
from model.distarc import DistArcHead
from tests.numerics import assert_rel
from train.config import OptimConfig
from train import lazy_rows
from train.engine import build_head_optimizer
from train.lazy_rows import LazyRowAdamW, LazyRowSGD

ROWS, DIM, STEPS = 9, 5, 6
ADAMW = dict(lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
SGD = dict(lr=0.05, momentum=0.9, weight_decay=0.1)


def _lazy(kind: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return LazyRowAdamW(params, **ADAMW) if kind == "adamw" else LazyRowSGD(params, **SGD)


def _torch(kind: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, **ADAMW, foreach=False)
    return torch.optim.SGD(params, **SGD, foreach=False)


@pytest.fixture(params=["whole", "blocks of 2 rows"])
def row_blocks(request, monkeypatch) -> None:
    """The update in one block, or a few rows at a time (as a large table's, to bound its temporaries)."""
    if request.param != "whole":
        monkeypatch.setattr(lazy_rows, "CHUNK_BYTES", 2 * DIM * 4)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_dense_gradient_steps_like_torch(kind: str, row_blocks: None) -> None:
    """Every row touched every step: the lazy optimizer is torch's (per-row steps = the global step)."""
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    lazy, ref = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt_lazy, opt_ref = _lazy(kind, [lazy]), _torch(kind, [ref])
    for step in range(STEPS):
        grad = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(step + 1))
        lazy.grad, ref.grad = grad.clone(), grad.clone()
        opt_lazy.step()
        opt_ref.step()
    assert_rel(lazy.detach(), ref.detach(), f"lazy {kind} vs torch", 1e-6)
    assert (lazy.detach() - start).abs().min() > 0


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_sparse_gradient_steps_only_its_rows_each_as_its_own_parameter(kind: str, row_blocks: None) -> None:
    """Row r moves only on the steps whose gradient holds it, as if it had its own optimizer stepped then (its
    own step count: Adam's bias correction is per row). Indices repeat, as micro-batches accumulate them: the
    row's gradient is their sum."""
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0))
    table = start.clone().requires_grad_()
    opt = _lazy(kind, [table])
    rows = [start[r].clone().requires_grad_() for r in range(ROWS)]
    ref_opts = [_torch(kind, [row]) for row in rows]
    never = ROWS - 1
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 + step)
        index = torch.randint(0, ROWS - 1, (6,), generator=gen)  # duplicates likely; row ROWS - 1 never drawn
        values = torch.randn(6, DIM, generator=gen)
        table.grad = torch.sparse_coo_tensor(index[None], values, (ROWS, DIM), check_invariants=True)  # uncoalesced
        opt.step()
        for r in index.unique().tolist():
            rows[r].grad = values[index == r].sum(0)
            ref_opts[r].step()
    assert_rel(table.detach(), torch.stack([row.detach() for row in rows]), f"lazy {kind} vs per-row torch", 1e-6)
    assert torch.equal(table.detach()[never], start[never])  # not even weight decay touched it
    if kind == "adamw":
        steps = opt.state[table]["row_step"]
        assert steps[never] == 0 and steps.max() < STEPS and len(set(steps.tolist())) > 2  # rows count their own


def test_the_sampled_head_gives_a_row_sparse_gradient_equal_to_its_dense_one() -> None:
    """Two micro-batches (gradient accumulation: their positives differ, so do their samples) accumulate a
    sparse gradient equal to the dense head's; it lists only sampled rows."""
    cfg = LossConfig(name="distarc", sample_rate=0.4, radial_weight=0.05, phi_weight=0.5)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, DIM, generator=gen), torch.randint(0, 20, (8,), generator=gen)) for _ in range(2)]
    grads, losses = [], []
    for sparse in (False, True):
        head = DistArcHead(cfg, 20, DIM)
        head.sparse_row_grads = sparse
        for emb, labels in batches:
            loss = head(emb, labels, step=4)["loss"]
            loss.backward()
            losses.append(loss.detach())
        grads.append(head.weight.grad)
    dense, sparse_grad = grads
    assert not dense.is_sparse and sparse_grad.is_sparse
    assert losses[:2] == losses[2:]
    assert_rel(sparse_grad.to_dense(), dense, "sparse vs dense head gradient", 1e-6)
    kept = sparse_grad.coalesce().indices()[0]
    positives = {c for _, labels in batches for c in labels.tolist()}
    assert 8 <= kept.numel() < 20 and positives <= set(kept.tolist())  # 0.4 x 20 per batch, all positives kept
    # the dense gradient reaches no row outside the sample (a kept row's may underflow to 0: exp of -100s)
    assert set(dense.abs().sum(1).nonzero()[:, 0].tolist()) <= set(kept.tolist())


@pytest.mark.parametrize("kind", ["lazy_adamw", "lazy_sgd"])
def test_rows_outside_the_sample_keep_their_values_and_state(kind: str) -> None:
    """Two head steps: the dense optimizer moves rows sampled once, then not (their momentum), the lazy one
    leaves them where the last step that sampled them put them."""
    # radii near the embeddings' norms: no softmax probability underflows, so every sampled row's gradient is
    # nonzero and every sampled row moves
    cfg = LossConfig(name="distarc", sample_rate=0.3, radial_weight=0.05, radius_start=2.0, radius_gap=0.5)
    gen = torch.Generator().manual_seed(5)
    emb, labels = torch.randn(4, DIM, generator=gen), torch.randint(0, 30, (4,), generator=gen)
    moved_outside = {}
    for name in (kind.removeprefix("lazy_"), kind):
        head = DistArcHead(cfg, 30, DIM)
        opt, _ = build_head_optimizer(head, OptimConfig(head_optimizer=name, head_lr=0.1), max_steps=10)
        assert head.sparse_row_grads == name.startswith("lazy_")
        head(emb, labels, step=0)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_first = head.weight.detach().clone()
        head(emb, labels, step=1)["loss"].backward()
        second = head.weight.grad.coalesce().indices()[0] if head.weight.grad.is_sparse else None
        opt.step()
        changed = (head.weight.detach() - after_first).abs().sum(1) > 0
        if second is not None:
            outside = torch.ones(30, dtype=torch.bool)
            outside[second] = False
            assert not changed[outside].any() and changed[second].all()
        moved_outside[name] = int(changed.sum())
    assert moved_outside[kind] < moved_outside[kind.removeprefix("lazy_")]  # the dense one moved more rows


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_rank_without_classes_steps(kind: str) -> None:
    """C < P leaves a rank an empty shard: its step is a no-op (as torch's optimizers), not an IndexError."""
    empty = torch.zeros(0, DIM, requires_grad=True)
    opt = _lazy(kind, [empty])
    for grad in (
        torch.zeros(0, DIM),
        torch.sparse_coo_tensor(
            torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, DIM), (0, DIM), check_invariants=True
        ),
    ):
        empty.grad = grad
        opt.step()
    assert empty.shape == (0, DIM)
