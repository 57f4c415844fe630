"""Sharded softmax cross-entropy over class chunks, recomputed in backward (loss.class_chunk).

The plain heads build their logits [G, C] for every local class at once, and autograd keeps several
such blocks (logits, their exp, the elementwise terms' saved inputs; CHEST's [G, C, K] distances) plus
normalised or mapped copies of the table and their gradients until backward: at G = 256 DistArc holds
~10 KB per class beside the 8 KB of weight, gradient and AdamW moments (bench/capacity.py). Here the
logits exist one chunk of `chunk` classes at a time: the forward keeps a running log-sum-exp per sample
and space, and the backward recomputes each chunk with autograd on, turns its logits into softmax
gradients with the global log-sum-exp, and writes that chunk's rows of the table gradient. The price is
one more forward of the logits (about a third more head FLOPs); loss and gradients are those of
`model.collectives.sharded_cross_entropy` over the whole shard, up to float rounding.

The chunk function sees a slice of the table and returns, per softmax ("space"), that slice's logits and
the numerator logit of the samples whose class lies in the slice, plus optional detached per-sample
statistics. Parameters it uses besides the table (CHEST's shared FC h) are passed as `params`, inputs of
the autograd node like the table: their gradients, summed over chunks, are returned to autograd.

Two more passes share the chunking: `chunked_sharded_argmin` (predictions over the shard's classes, ties
to the lowest id) and `chunked_gathered_sum` (a per-row loss over gathered table rows, CHEST's HypHC). A
gathered sum over the same table can also ride in the cross-entropy's node
(`chunked_cross_entropy_and_sum`): both then write one table gradient, where two nodes return one each and
autograd holds both at the backward's peak (CHEST + HypHC: 20 -> 16 bytes per table value with AdamW).

Legend: G global batch, C classes on this rank, c classes in a chunk, D row shape, N spaces, S statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from model.collectives import _world, argmin_over_ranks

# (x_GD, rows_cD, start, target_col_G relative to start (-1 elsewhere))
#     -> ([logits_Gc per space], [target_G per space], stats_SG or None)
ChunkLogits = Callable[
    [torch.Tensor, torch.Tensor, int, torch.Tensor],
    tuple[list[torch.Tensor], list[torch.Tensor], "torch.Tensor | None"],
]


def _chunk_targets(target_col_G: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    inside = (target_col_G >= start) & (target_col_G < stop)
    return torch.where(inside, target_col_G - start, -1)


def _chunks(num_local: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, num_local)) for start in range(0, num_local, chunk)]


@dataclass(frozen=True)
class GatheredTerm:
    """`sum over chunks of fn([table[g[start:stop]] for g in gathers] (+ [extra[start:stop]]), start, stop)`:
    a scalar over rows gathered from a table, `chunk` rows of the index lists at a time."""

    fn: Callable[[list[torch.Tensor], int, int], torch.Tensor]
    gathers: tuple[torch.Tensor, ...]
    chunk: int
    num_rows: int


def _gathered_sum_forward(table_MD: torch.Tensor, extra_ND: torch.Tensor | None, term: GatheredTerm) -> torch.Tensor:
    total = torch.zeros((), device=table_MD.device)
    for start, stop in _chunks(term.num_rows, term.chunk):
        total += term.fn(_gathered(table_MD, extra_ND, term.gathers, start, stop), start, stop).float()
    return total


def _gathered_sum_backward(
    table_MD: torch.Tensor,
    extra_ND: torch.Tensor | None,
    term: GatheredTerm,
    grad: torch.Tensor,
    grad_table: torch.Tensor | None,
    grad_extra: torch.Tensor | None,
    params: Sequence[torch.Tensor],
    grad_params: Sequence[torch.Tensor | None],
) -> None:
    """Adds d(grad * the term)/d(table rows, extra rows, params) into the given buffers (None: not wanted);
    the table's rows are index-added (autograd's gather backward would allocate a table per chunk)."""
    grad_rows = None if grad_table is None else grad_table.view(-1, table_MD.shape[-1])
    wanted_params = [p for p, acc in zip(params, grad_params, strict=True) if acc is not None]
    accumulators = [acc for acc in grad_params if acc is not None]
    for start, stop in _chunks(term.num_rows, term.chunk):
        rows = [r.detach().requires_grad_(True) for r in _gathered(table_MD, extra_ND, term.gathers, start, stop)]
        with torch.enable_grad():
            value = term.fn(rows, start, stop).float()
        found = torch.autograd.grad(value, rows + wanted_params, grad, allow_unused=True)
        for role, g in enumerate(found[: len(rows)]):
            if g is None:
                continue
            if role < len(term.gathers) and grad_rows is not None:
                grad_rows.index_add_(0, term.gathers[role][start:stop], g)
            elif role == len(term.gathers) and grad_extra is not None:
                grad_extra[start:stop] += g
        for acc, g in zip(accumulators, found[len(rows) :], strict=True):
            if g is not None:
                acc += g
        del rows, value, found


class _ChunkedShardedCrossEntropy(torch.autograd.Function):
    """loss_NG = lse_NG - target_NG over every rank's classes; forward keeps only [N, G] running sums,
    backward recomputes one chunk at a time. With a GatheredTerm over the same table, its value is the third
    output and its gradient goes into the same table buffer. Inputs with gradients: x, the table, the term's
    extra rows and `params` (last)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_GD: torch.Tensor,
        table_CD: torch.Tensor,
        target_col_G: torch.Tensor,
        fn: ChunkLogits,
        chunk: int,
        group: ProcessGroup | None,
        counts: tuple[int, int],
        term: GatheredTerm | None,
        extra_ND: torch.Tensor | None,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, world = _world(group)
        num_rows = x_GD.shape[0]
        # a rank with no classes keeps max -inf and sum 0: it adds nothing, but joins the collectives
        num_spaces, num_stats = counts
        max_NG = torch.full((num_spaces, num_rows), -torch.inf, device=x_GD.device)
        # the running sum (and what is summed over ranks) in fp64, [N, G] only: in fp32 the chunk after chunk
        # additions lost 5.9e-5 of a 1M-class loss at 256 classes a chunk (3.2e-6 at 4096; now 7e-8, 4e-7)
        sum_NG, target_NG = torch.zeros_like(max_NG, dtype=torch.float64), torch.zeros_like(max_NG)
        stats_SG = torch.zeros((num_stats, num_rows), device=x_GD.device)  # zeros where no chunk ran
        for start, stop in _chunks(table_CD.shape[0], chunk):
            cols = _chunk_targets(target_col_G, start, stop)
            logits, targets, chunk_stats = fn(x_GD, table_CD[start:stop], start, cols)
            for n, (lg, tg) in enumerate(zip(logits, targets, strict=True)):
                # online log-sum-exp: the running sum rescaled to the new running max; a max still at -inf
                # (every logit so far -inf) shifts by 0 instead, as exp(-inf - -inf) would be NaN
                new_max = torch.maximum(max_NG[n], lg.max(dim=1).values.float())
                shift = torch.where(torch.isneginf(new_max), 0.0, new_max)
                chunk_sum = torch.exp(lg - shift[:, None]).sum(dim=1).double()
                sum_NG[n] = sum_NG[n] * torch.exp(max_NG[n] - shift).double() + chunk_sum
                max_NG[n] = new_max
                target_NG[n] = torch.where(cols >= 0, tg.float(), target_NG[n])
            if chunk_stats is not None:
                if chunk_stats.shape[0] != num_stats:  # [1, G] would broadcast into [0, G] and vanish
                    raise ValueError(
                        f"the chunk function gave {chunk_stats.shape[0]} statistics, num_stats={num_stats}"
                    )
                stats_SG += chunk_stats.float()
            del logits, targets, chunk_stats
        global_max_NG = max_NG.clone()
        if world > 1:
            dist.all_reduce(global_max_NG, op=dist.ReduceOp.MAX, group=group)
        # (-inf where this rank has no classes; a NaN logit stays NaN, so the step is seen as non-finite)
        local_sum_NG = torch.where(torch.isneginf(max_NG), 0.0, sum_NG * torch.exp(max_NG - global_max_NG).double())
        sums_2NG = torch.stack([local_sum_NG, target_NG.double()])  # one all-reduce: [sums of exp, owners' targets]
        if world > 1:
            dist.all_reduce(sums_2NG, group=group)
        lse64_NG = global_max_NG.double() + torch.log(sums_2NG[0])
        lse_NG = lse64_NG.float()  # for the backward's probabilities
        total = torch.zeros((), device=x_GD.device) if term is None else _gathered_sum_forward(table_CD, extra_ND, term)
        ctx.save_for_backward(x_GD, table_CD, target_col_G, lse_NG, extra_ND, *params)
        ctx.fn, ctx.chunk, ctx.term = fn, chunk, term
        ctx.mark_non_differentiable(stats_SG)
        return (lse64_NG - sums_2NG[1]).float(), stats_SG, total

    @staticmethod
    @once_differentiable  # the recompute is not itself differentiable: create_graph=True must fail loudly
    def backward(
        ctx: Any, grad_NG: torch.Tensor, _grad_stats: torch.Tensor, grad_total: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x_GD, table_CD, target_col_G, lse_NG, extra_ND, *params = ctx.saved_tensors
        wants_x, wants_table, wants_params = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[9:]
        x = x_GD.detach().requires_grad_(wants_x)
        grad_x = torch.zeros_like(x_GD) if wants_x else None
        grad_table = torch.empty_like(table_CD) if wants_table else None
        # params take part as themselves (the chunk function uses the module's own tensors); their
        # gradients are returned, summed over chunks, so autograd accumulates them once, hooks included
        grad_params = [torch.zeros_like(p) if wanted else None for p, wanted in zip(params, wants_params, strict=True)]
        for start, stop in _chunks(table_CD.shape[0], ctx.chunk):
            cols = _chunk_targets(target_col_G, start, stop)
            rows = table_CD[start:stop].detach().requires_grad_(wants_table)
            inputs = [t for t, wanted in ((x, wants_x), (rows, wants_table), *zip(params, wants_params)) if wanted]
            if not inputs:
                continue
            with torch.enable_grad():
                logits, targets, _ = ctx.fn(x, rows, start, cols)
            outputs, grads = [], []
            for n, (lg, tg) in enumerate(zip(logits, targets, strict=True)):
                # d loss_n / d logit = its softmax (global log-sum-exp); d loss_n / d target = -1 where owned
                outputs += [lg, tg]
                grads += [
                    torch.exp(lg.detach().float() - lse_NG[n][:, None]).to(lg.dtype) * grad_NG[n][:, None],
                    torch.where(cols >= 0, -grad_NG[n], 0.0).to(tg.dtype),
                ]
            found = dict(
                zip(map(id, inputs), torch.autograd.grad(outputs, inputs, grads, allow_unused=True), strict=True)
            )
            if grad_x is not None and found.get(id(x)) is not None:
                grad_x += found[id(x)]
            if grad_table is not None:
                g_rows = found.get(id(rows))
                grad_table[start:stop] = 0.0 if g_rows is None else g_rows
            for i, p in enumerate(params):
                g_p, acc = found.get(id(p)), grad_params[i]
                if acc is not None and g_p is not None:
                    acc += g_p
            del logits, targets, outputs, grads, found  # before the next chunk's: one chunk's blocks at a time
        grad_extra = None
        if ctx.term is not None:  # every row of grad_table is written above: the term's rows add to them
            grad_extra = torch.zeros_like(extra_ND) if ctx.needs_input_grad[8] and extra_ND is not None else None
            _gathered_sum_backward(
                table_CD, extra_ND, ctx.term, grad_total, grad_table, grad_extra, params, grad_params
            )
        # zeros, not None, for params no chunk reached (a rank without classes): replicated grads are all-reduced
        return grad_x, grad_table, None, None, None, None, None, None, grad_extra, *grad_params


def chunked_sharded_cross_entropy(
    fn: ChunkLogits,
    x_GD: torch.Tensor,
    table_CD: torch.Tensor,
    target_col_G: torch.Tensor,
    chunk: int,
    group: ProcessGroup | None = None,
    params: Sequence[nn.Parameter] = (),
    num_spaces: int = 1,
    num_stats: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample `logsumexp_j(z_j) - z_target` of each space over every rank's classes, `chunk` local
    classes at a time.

    Args:
        fn: the head's logits of one slice of `table_CD` (see ChunkLogits), `num_spaces` softmaxes; it is
            called twice per chunk (forward without autograd, backward with), so it must be deterministic.
        x_GD: the global batch's embeddings, gradients flow to it.
        table_CD: this rank's rows (a parameter, or the rows Partial-FC kept), gradients flow to it.
        target_col_G: each sample's row in `table_CD`, -1 where another rank owns its class.
        chunk: local classes per block (>= 1; the whole shard when larger).
        group: the process group the classes are sharded over (None: the default group, or one process).
        params: other tensors `fn` uses that need gradients (CHEST's shared FC h), by identity.
        num_spaces: how many softmaxes `fn` returns (CHEST: one per space).
        num_stats: rows of fn's statistics (0 when it returns None).

    Returns:
        (loss_NG identical on every rank, the sum over chunks of fn's statistics [S, G], detached).
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1 (loss.class_chunk)")
    loss_NG, stats, _ = _ChunkedShardedCrossEntropy.apply(
        x_GD, table_CD, target_col_G, fn, chunk, group, (num_spaces, num_stats), None, None, *params
    )
    return loss_NG, stats


def chunked_cross_entropy_and_sum(
    fn: ChunkLogits,
    x_GD: torch.Tensor,
    table_CD: torch.Tensor,
    target_col_G: torch.Tensor,
    chunk: int,
    term: GatheredTerm,
    extra_ND: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
    params: Sequence[nn.Parameter] = (),
    num_spaces: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked_sharded_cross_entropy` and `chunked_gathered_sum` over the same table in one autograd node:
    (loss_NG, the term's scalar). Values and gradients are those of the two calls; the table's gradient is
    one buffer instead of two (the term's `gathers` index rows of the table's [-1, D] view; `extra_ND`:
    rows aligned with them, gradients flow to it)."""
    if chunk < 1 or term.chunk < 1:
        raise ValueError(f"chunk={min(chunk, term.chunk)} must be >= 1 (loss.class_chunk)")
    loss_NG, _, total = _ChunkedShardedCrossEntropy.apply(
        x_GD, table_CD, target_col_G, fn, chunk, group, (num_spaces, 0), term, extra_ND, *params
    )
    return loss_NG, total


def chunked_sharded_argmin(
    values_fn: Callable[[int, int], dict[str, torch.Tensor]],
    num_local: int,
    chunk: int,
    class_start: int,
    group: ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """Per rule, the global class id of the smallest value per row, `chunk` local classes at a time.

    `values_fn(start, stop)` gives each rule's values [G, stop - start] for local classes [start, stop)
    (called once with (0, 0) on a rank without classes). Ties go to the lowest class id, as
    `model.collectives.sharded_argmin`, which this equals with chunk >= num_local.
    """
    best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for start, stop in _chunks(num_local, max(chunk, 1)) or [(0, 0)]:
        for rule, values in values_fn(start, stop).items():
            if values.shape[1] == 0:
                low = torch.full((values.shape[0],), torch.inf, dtype=values.dtype, device=values.device)
                idx = torch.full((values.shape[0],), -1, dtype=torch.long, device=values.device)
            else:
                low, idx = values.min(dim=1)
                idx = idx + class_start + start
            if rule in best:  # strictly smaller only: an earlier chunk (lower ids) keeps its ties
                prev_low, prev_idx = best[rule]
                better = low < prev_low
                low, idx = torch.where(better, low, prev_low), torch.where(better, idx, prev_idx)
            best[rule] = (low, idx)
    return {rule: argmin_over_ranks(low, idx, group) for rule, (low, idx) in best.items()}


class _ChunkedGatheredSum(torch.autograd.Function):
    """A GatheredTerm's value, recomputed in backward; the table's gradient is index-added into one buffer.
    Inputs with gradients: the table, `extra` and `params` (last)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, table_MD: torch.Tensor, extra_ND: torch.Tensor | None, term: GatheredTerm, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(table_MD, extra_ND, *params)
        ctx.term = term
        return _gathered_sum_forward(table_MD, extra_ND, term)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        table_MD, extra_ND, *params = ctx.saved_tensors
        wants_table, wants_extra, wants_params = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[3:],
        )
        grad_table = torch.zeros_like(table_MD) if wants_table else None
        grad_extra = torch.zeros_like(extra_ND) if wants_extra and extra_ND is not None else None
        grad_params = [torch.zeros_like(p) if wanted else None for p, wanted in zip(params, wants_params, strict=True)]
        _gathered_sum_backward(table_MD, extra_ND, ctx.term, grad, grad_table, grad_extra, params, grad_params)
        # the buffer goes back whole, not as a view: autograd then adds the other paths' gradients in place
        return grad_table, grad_extra, None, *grad_params


def _gathered(
    table_MD: torch.Tensor, extra_ND: torch.Tensor | None, gathers: Sequence[torch.Tensor], start: int, stop: int
) -> list[torch.Tensor]:
    flat = table_MD.view(-1, table_MD.shape[-1])
    rows = [flat[index[start:stop]] for index in gathers]
    return rows if extra_ND is None else [*rows, extra_ND[start:stop]]


def chunked_gathered_sum(
    fn: Callable[[list[torch.Tensor], int, int], torch.Tensor],
    table_MD: torch.Tensor,
    gathers: Sequence[torch.Tensor],
    chunk: int,
    extra_ND: torch.Tensor | None = None,
    params: Sequence[nn.Parameter] = (),
) -> torch.Tensor:
    """`sum_chunks fn([table[g[start:stop]] for g in gathers] (+ [extra[start:stop]]), start, stop)`, a scalar,
    `chunk` rows of the index lists at a time, recomputed in backward: nothing but the inputs waits for it.

    Args:
        fn: a per-chunk scalar (e.g. the HypHC triplet losses of `chunk` anchor classes), deterministic.
        table_MD: rows to gather from, the parameter itself, any shape [..., D] (indices count rows of its
            [-1, D] view); its gradient is one index-added buffer of its own shape, returned whole (a view
            would make autograd add the other paths' gradients out of place: a third table-sized buffer).
        gathers: row indices into `table_MD`, all of the same length N (one list per role).
        extra_ND: optional rows aligned with the index lists (row i goes with index i), gradients flow to it.
        params: other tensors `fn` uses that need gradients (CHEST's shared FC h), by identity.
    """
    return gathered_sum(gathered_term(fn, table_MD, gathers, chunk, extra_ND), table_MD, extra_ND, params)


def gathered_sum(
    term: GatheredTerm,
    table_MD: torch.Tensor,
    extra_ND: torch.Tensor | None = None,
    params: Sequence[nn.Parameter] = (),
) -> torch.Tensor:
    """`chunked_gathered_sum` of a GatheredTerm already built (e.g. the one that rides elsewhere otherwise)."""
    if term.chunk < 1:
        raise ValueError(f"chunk={term.chunk} must be >= 1 (loss.class_chunk)")
    return _ChunkedGatheredSum.apply(table_MD, extra_ND, term, *params)


def gathered_term(
    fn: Callable[[list[torch.Tensor], int, int], torch.Tensor],
    table_MD: torch.Tensor,
    gathers: Sequence[torch.Tensor],
    chunk: int,
    extra_ND: torch.Tensor | None = None,
) -> GatheredTerm:
    """The GatheredTerm of `chunked_gathered_sum`'s arguments (index lists moved to the table's device)."""
    num_rows = int(gathers[0].shape[0]) if gathers else (0 if extra_ND is None else int(extra_ND.shape[0]))
    return GatheredTerm(fn, tuple(g.to(table_MD.device) for g in gathers), chunk, num_rows)
