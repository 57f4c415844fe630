"""Autograd-aware collectives for class-sharded heads.

Every function takes an explicit `group` (None = the default group) and degrades to the identity
when torch.distributed is not initialised, so the same head code runs single-process.

Legend: B = local batch, P = ranks, G = P * B global batch, C = classes on this rank, D = dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _world(group: ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# Backends that reduce-scatter natively. gloo's reduce_scatter_tensor (every torch >= 2.4 has one) is an
# all-reduce inside, so gloo takes the explicit all-reduce below; the tests add "gloo" here to run NCCL's
# branch on CPU processes.
REDUCE_SCATTER_BACKENDS = frozenset({"nccl"})


def _sum_then_slice(grad_GD: torch.Tensor, rank: int, world: int, group: ProcessGroup | None) -> torch.Tensor:
    """Reduce-scatter (sum) of the per-rank partial gradients: rows of `rank` summed over ranks."""
    rows = grad_GD.shape[0] // world
    if dist.get_backend(group) in REDUCE_SCATTER_BACKENDS:
        out = torch.empty((rows, *grad_GD.shape[1:]), dtype=grad_GD.dtype, device=grad_GD.device)
        dist.reduce_scatter_tensor(out, grad_GD.contiguous(), group=group)
        return out
    # otherwise an all-reduce gives the same sum, at P times the traffic
    full = grad_GD.contiguous().clone()
    dist.all_reduce(full, group=group)
    return full[rank * rows : (rank + 1) * rows]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_BD: torch.Tensor, group: ProcessGroup | None, grad_scale: float) -> torch.Tensor:
        rank, world = _world(group)
        ctx.group, ctx.rank, ctx.world, ctx.grad_scale = group, rank, world, grad_scale
        parts = [torch.empty_like(x_BD) for _ in range(world)]
        dist.all_gather(parts, x_BD.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_GD: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad_BD = _sum_then_slice(grad_GD, ctx.rank, ctx.world, ctx.group)
        return grad_BD * ctx.grad_scale, None, None


def all_gather_with_grad(
    x_BD: torch.Tensor, group: ProcessGroup | None = None, grad_scale: float = 1.0
) -> torch.Tensor:
    """Concatenate every rank's `x_BD` (equal B on all ranks) into `x_GD`, rank order.

    Backward sums each rank's gradient for the rows it contributed (a reduce-scatter), because
    every rank's sharded loss depends on every embedding. `grad_scale` then multiplies the result:
    pass the world size when the caller's optimizer *averages* replicated gradients over ranks
    (DDP, DeepSpeed ZeRO), so that the backbone ends with the gradient of the one global loss.
    """
    _, world = _world(group)
    if world == 1:
        return x_BD * grad_scale + x_BD.detach() * (1.0 - grad_scale) if grad_scale != 1.0 else x_BD
    return _AllGatherWithGrad.apply(x_BD, group, grad_scale)


def all_gather_no_grad(x_B: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's tensor (equal shapes) along dim 0; no gradient (labels, ids)."""
    _, world = _world(group)
    if world == 1:
        return x_B
    parts = [torch.empty_like(x_B) for _ in range(world)]
    dist.all_gather(parts, x_B.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def all_reduce_sum_no_grad(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum of a detached copy of `x` over ranks (for logged statistics held by class owners)."""
    x = x.detach().clone()
    if _world(group)[1] > 1:
        dist.all_reduce(x, group=group)
    return x


class _ShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits_GC: torch.Tensor, target_G: torch.Tensor, owner_G: torch.Tensor, group: ProcessGroup | None
    ) -> torch.Tensor:
        _, world = _world(group)
        with torch.no_grad():
            if logits_GC.shape[1] > 0:
                max_G = logits_GC.max(dim=1).values
            else:  # a rank with no classes (C < P) contributes nothing to the softmax
                max_G = torch.full_like(target_G, -torch.inf)
            if world > 1:
                dist.all_reduce(max_G, op=dist.ReduceOp.MAX, group=group)
            exp_GC = torch.exp(logits_GC - max_G[:, None])
            # one fused all-reduce: [sum of exp, owner's target logit]
            sums_G2 = torch.stack([exp_GC.sum(dim=1), torch.where(owner_G, target_G, 0.0)], dim=1)
            if world > 1:
                dist.all_reduce(sums_G2, group=group)
            loss_G = max_G + torch.log(sums_G2[:, 0]) - sums_G2[:, 1]
        ctx.save_for_backward(exp_GC, sums_G2[:, 0], owner_G)
        return loss_G

    @staticmethod
    def backward(ctx: Any, grad_G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        exp_GC, sum_G, owner_G = ctx.saved_tensors
        grad_logits = exp_GC * (grad_G / sum_G)[:, None]
        grad_target = -grad_G * owner_G.to(grad_G.dtype)
        return grad_logits, grad_target, None, None


def sharded_cross_entropy(
    logits_GC: torch.Tensor, target_G: torch.Tensor, owner_G: torch.Tensor, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Per-sample `logsumexp_j(z_j) - z_target`, the softmax spanning every rank's classes.

    Args:
        logits_GC: this rank's logits (fp32) for all G samples of the global batch; these form
            the denominator.
        target_G: the numerator logit of each sample, meaningful only where `owner_G` is True
            (this rank owns the sample's class). Usually equal to the target column of
            `logits_GC`, but DistArc's official form uses a different numerator.
        owner_G: bool mask of samples whose class lives on this rank.

    Returns:
        loss_G, identical on every rank. Its backward reaches only local logits and local targets,
        so summing every rank's gradients gives the gradient of the single global loss.
    """
    return _ShardedCrossEntropy.apply(logits_GC.float(), target_G.float(), owner_G, group)


def sharded_argmin(values_GC: torch.Tensor, class_start: int, group: ProcessGroup | None = None) -> torch.Tensor:
    """Global class id of the smallest value per row, the columns spread over ranks.

    Ties go to the lowest class id on every rank alike.
    """
    if values_GC.shape[1] > 0:
        min_G, idx_G = values_GC.min(dim=1)
        idx_G = idx_G + class_start
    else:
        min_G = torch.full((values_GC.shape[0],), torch.inf, dtype=values_GC.dtype, device=values_GC.device)
        idx_G = torch.full((values_GC.shape[0],), -1, dtype=torch.long, device=values_GC.device)
    return argmin_over_ranks(min_G, idx_G, group)


def argmin_over_ranks(min_G: torch.Tensor, idx_G: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Each rank's best (value, global class id) per row -> the id of the smallest value over ranks
    (ties: the lowest rank, which holds the lowest ids). A rank without classes passes (inf, -1)."""
    _, world = _world(group)
    if world == 1:
        return idx_G
    mins = [torch.empty_like(min_G) for _ in range(world)]
    idxs = [torch.empty_like(idx_G) for _ in range(world)]
    dist.all_gather(mins, min_G.contiguous(), group=group)
    dist.all_gather(idxs, idx_G.contiguous(), group=group)
    best_rank = torch.stack(mins).argmin(dim=0)  # first occurrence = lowest rank = lowest class id
    return torch.stack(idxs).gather(0, best_rank[None]).squeeze(0)


class _GatherAndExchange(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_BD: torch.Tensor,
        send_ND: torch.Tensor,
        dst: int,
        src: int,
        recv_rows: int,
        group: ProcessGroup | None,
        grad_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rank, world = _world(group)
        ctx.group, ctx.rank, ctx.world, ctx.grad_scale = group, rank, world, grad_scale
        ctx.dst, ctx.src, ctx.send_shape = dst, src, send_ND.shape
        parts = [torch.empty_like(x_BD) for _ in range(world)]
        dist.all_gather(parts, x_BD.contiguous(), group=group)
        recv = torch.empty((recv_rows, *send_ND.shape[1:]), dtype=send_ND.dtype, device=send_ND.device)
        _send_recv(send_ND.contiguous(), dst, recv, src, group)
        return torch.cat(parts, dim=0), recv

    @staticmethod
    def backward(
        ctx: Any, grad_GD: torch.Tensor, grad_recv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None, None, None]:
        # Both collectives in one node, in a fixed order: autograd may visit separate nodes in a
        # different order on different ranks, and collectives issued out of order deadlock.
        grad_BD = _sum_then_slice(grad_GD, ctx.rank, ctx.world, ctx.group) * ctx.grad_scale
        grad_send = torch.empty(ctx.send_shape, dtype=grad_recv.dtype, device=grad_recv.device)
        # gradients travel back the way the rows came: to the sender, from the receiver
        _send_recv(grad_recv.contiguous(), ctx.src, grad_send, ctx.dst, ctx.group)
        return grad_BD, grad_send, None, None, None, None, None


def _send_recv(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group: ProcessGroup | None) -> None:
    to = dist.get_global_rank(group, dst) if group is not None else dst
    frm = dist.get_global_rank(group, src) if group is not None else src
    # Sizes are known on both sides (class ranges), so empty messages can be skipped symmetrically;
    # gloo does not complete zero-byte transfers.
    ops = []
    if send.numel():
        ops.append(dist.P2POp(dist.isend, send, to, group))
    if recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, frm, group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def all_gather_and_exchange(
    x_BD: torch.Tensor,
    send_ND: torch.Tensor,
    dst: int,
    src: int,
    recv_rows: int,
    group: ProcessGroup | None = None,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`all_gather_with_grad(x_BD)` plus a point-to-point exchange, as one autograd node.

    Sends `send_ND` to rank `dst` and receives `recv_rows` rows from rank `src` (group ranks). The
    backward sums the gathered gradients as `all_gather_with_grad` does, returns the received rows'
    gradients to `src` and collects the sent rows' gradients from `dst`. Every rank must call it.
    """
    return _GatherAndExchange.apply(x_BD, send_ND, dst, src, recv_rows, group, grad_scale)
