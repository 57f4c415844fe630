"""Lazy row optimizers for a Partial-FC class table (optim.head_optimizer=lazy_adamw / lazy_sgd).

With loss.sample_rate < 1 a step's loss reads only the sampled rows of the table. The dense optimizers
(arcface_torch's PartialFC v2) still hold a table-sized gradient, zero outside the sample, and move every
row: AdamW's moments and weight decay act on rows that were not in this step's softmax. The lazy forms
(Partial FC v1; TensorFlow's LazyAdam) touch only the rows in the step's sparse gradient: the head's
gather yields a sparse [C, D] gradient of the kept rows (model.proxies.ShardedHead.sparse_row_grads), no
table-sized gradient exists, and each row's state advances only on the steps that sampled it:

- lazy_adamw: AdamW on each row as if it were its own parameter: its moments, its step count (`row_step`,
  so the bias correction is that row's own, not the global step's, which would leave a rarely sampled row's
  first updates ~1/(1 - beta1^t) too small), and decoupled weight decay on the rows updated. Per class
  4 B x (weight + 2 moments) x D + 4 B, against dense AdamW's 4 B x 4 x D (its gradient too).
- lazy_sgd: SGD with momentum (dampening 0, coupled weight decay, as torch.optim.SGD) on the sampled rows;
  4 B x 2 x D per class against SGD's 3 x D.

A dense gradient (the head at sample rate 1, where every row is in every step's softmax) updates every row:
the steps are then those of torch.optim.AdamW / SGD. Only for tables whose unsampled rows get no gradient at
all: DistArc and its baselines, not CHEST (its regulariser reaches every proxy; train.config refuses it).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from typing import Any

import torch


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """A row-sparse gradient with each row once (summed) and in row order. One micro-batch's gather of the
    sorted sample already is: marked so without coalesce()'s sort and copy of the values (at 400k classes,
    rate 0.1 on this CPU: 0.27 s of a 0.97 s update). Micro-batches accumulate by concatenation: those are
    coalesced."""
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        return torch.sparse_coo_tensor(
            grad._indices(), grad._values(), grad.shape, is_coalesced=True, check_invariants=False
        )
    return grad.coalesce()


def touched_rows(param: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(row index, the rows' gradient) of a row-sparse gradient; (None, grad) for a dense one (every row)."""
    if not grad.is_sparse:
        return None, grad
    if grad.sparse_dim() != 1 or grad.shape != param.shape:
        raise ValueError(f"a lazy row optimizer needs a row-sparse gradient of shape {tuple(param.shape)}")
    grad = coalesced(grad)
    return grad.indices()[0], grad.values()


# rows updated at a time: the update's temporaries (gathered rows, their state, the step) stay ~32 MiB each
# instead of the size of the sample (at 400k classes, rate 0.1, D = 512: 6 x 78 MB, 0.46 GiB at the peak)
CHUNK_BYTES = 32 * 2**20

Rows = slice | torch.Tensor  # a block of a dense update (views, updated in place) or gathered row indices


class LazyRowOptimizer(torch.optim.Optimizer, abc.ABC):
    """Shared loop: for every parameter with a gradient, update its touched rows a block at a time."""

    @abc.abstractmethod
    def _prepare(self, param: torch.Tensor) -> None:
        """Create the parameter's state on its first step; count the step."""

    @abc.abstractmethod
    def _update(self, param: torch.Tensor, rows: Rows, values: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        """Update `values` (the parameter's `rows`, a copy or a view) and their state with their gradient."""

    def _state_rows(self, param: torch.Tensor, rows: Rows, key: str) -> torch.Tensor:
        state = self.state[param][key]
        return state[rows] if isinstance(rows, slice) else state.index_select(0, rows)

    def _write(self, param: torch.Tensor, rows: Rows, key: str, values: torch.Tensor) -> None:
        target = param.detach() if key == "param" else self.state[param][key]
        if isinstance(rows, slice):
            if target[rows].data_ptr() != values.data_ptr():  # views were updated in place
                target[rows].copy_(values)
        else:
            target.index_copy_(0, rows, values)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._prepare(param)
                index, grad = touched_rows(param, param.grad)
                grad = grad.to(param.dtype)
                row_bytes = math.prod(param.shape[1:]) * param.element_size()  # a shard may hold no row (C < P)
                block = max(1, CHUNK_BYTES // max(1, row_bytes))
                count = param.shape[0] if index is None else index.numel()
                for a in range(0, count, block):
                    b = min(a + block, count)
                    if index is None:
                        rows: Rows = slice(a, b)
                        values = param.detach()[rows]
                    else:
                        rows = index[a:b]
                        values = param.detach().index_select(0, rows)
                    self._update(param, rows, values, grad[a:b], group)
        return loss


class LazyRowAdamW(LazyRowOptimizer):
    """AdamW with per-row moments, step counts and weight decay, on the rows a step's gradient touches."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _prepare(self, param: torch.Tensor) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)  # optimizer steps taken (bookkeeping; the rows count their own)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["row_step"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
        state["step"] += 1

    def _update(self, param: torch.Tensor, rows: Rows, values: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        row_step = self._state_rows(param, rows, "row_step") + 1
        exp_avg = self._state_rows(param, rows, "exp_avg").lerp_(grad, 1 - beta1)
        exp_avg_sq = self._state_rows(param, rows, "exp_avg_sq").mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        shape = (-1,) + (1,) * (param.dim() - 1)  # a row's scalars against its [D] (or [K, D]) values
        correction1 = (1 - beta1**row_step).view(shape)
        correction2_sqrt = (1 - beta2**row_step).sqrt().view(shape)
        denom = exp_avg_sq.sqrt().div_(correction2_sqrt).add_(eps)  # torch.optim.AdamW's order of operations
        if decay:
            values.mul_(1 - lr * decay)
        values.addcdiv_(exp_avg * (lr / correction1), denom, value=-1.0)
        for key, new in (("param", values), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("row_step", row_step)):
            self._write(param, rows, key, new)


class LazyRowSGD(LazyRowOptimizer):
    """SGD with momentum (dampening 0) and coupled weight decay on the rows a step's gradient touches. A row's
    buffer starts at zero, so its first update is its gradient, as torch.optim.SGD's first step."""

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _prepare(self, param: torch.Tensor) -> None:
        if not self.state[param]:
            self.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _update(self, param: torch.Tensor, rows: Rows, values: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        if group["weight_decay"]:
            grad = grad.add(values, alpha=group["weight_decay"])
        buffer = self._state_rows(param, rows, "momentum_buffer").mul_(group["momentum"]).add_(grad)
        values.sub_(buffer, alpha=group["lr"])
        self._write(param, rows, "param", values)
        self._write(param, rows, "momentum_buffer", buffer)
