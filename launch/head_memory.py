"""The class-sharded head's memory per rank, for `launch.estimate`: its table state by optimizer
(head_bytes_per_value, head_shards), the sharded softmax's [G, C] blocks (logit_bytes) and what else its
autograd graph holds at the step's peak, fitted to measured CPU head steps (HeadGraph, head_graph_bytes)."""

from __future__ import annotations

import dataclasses

import torch

from model.config import LossConfig
from model.proxies import class_range
from model.task import build_head

# the sharded softmax's own [G, C] blocks: the logits, its temporaries, their gradient (what else the head's graph
# holds at its peak, normalised table copies and the blocks saved for backward, is head_graph_bytes')
LOGIT_COPIES = 3
# per head value: fp32 weight + the optimizer's fp32 row state (AdamW: two moments; SGD: its momentum) + fp32 grad
HEAD_BYTES_PER_VALUE = {"adamw": 4 + 8 + 4, "sgd": 4 + 4 + 4, "lazy_adamw": 4 + 8, "lazy_sgd": 4 + 4}
# optim.fused=false runs torch's unfused AdamW: on GPUs its foreach form, one fp32 temporary of every value stepped,
# all at once; on CPU (no foreach there) the per-tensor form, two temporaries of the tensor being stepped (its
# denominator's sqrt and quotient) while the previous tensor's denominator is still referenced (measured on CPU,
# 25M values: foreach forced 4.1 B per value whether in 1 or 5 tensors; per tensor 8.1 B per value of a single
# tensor; fused and SGD none; tests/test_estimate.py)
FOREACH_ADAMW_BYTES = 4
PER_TENSOR_ADAMW_BYTES = 8
PREVIOUS_DENOMINATOR_BYTES = 4
# the lazy optimizers' gradient spans only the sampled rows (train/lazy_rows.py: a row-sparse gradient; dense,
# every row, at sample rate 1); their update's temporaries are blocks of lazy_rows.CHUNK_BYTES, not counted
LAZY_GRAD_BYTES = 4


# cheaper head optimizers a fix may offer, by the current one
HEAD_OPTIMIZER_FIXES = {
    "adamw": (
        ("sgd", "one momentum row per class instead of AdamW's two moments"),
        ("lazy_adamw", "no table-sized gradient: only the sampled rows' gradient and state are updated"),
    ),
    "sgd": (("lazy_sgd", "no table-sized gradient: only the sampled rows' gradient and momentum are updated"),),
    "lazy_adamw": (("lazy_sgd", "one momentum row per class instead of AdamW's two moments"),),
}


def head_bytes_per_value(head_optimizer: str, sample_rate: float) -> float:
    """Bytes per value of the head's table: its weight, its optimizer's state and its gradient (the lazy
    optimizers' gradient only over loss.sample_rate of the rows: at rate 1 they hold what the dense ones do)."""
    lazy = head_optimizer.startswith("lazy_")
    return HEAD_BYTES_PER_VALUE[head_optimizer] + (LAZY_GRAD_BYTES * min(sample_rate, 1.0) if lazy else 0.0)


def step_temporary_bytes(values: float, largest: tuple[float, float], optimizer: str, fused: bool, on_gpu: bool) -> int:
    """Bytes an optimizer step over `values` fp32 values allocates for itself: unfused AdamW's temporaries
    (optim.fused=false; foreach on GPUs; on CPU per tensor, `largest` its two largest tensors: at most the largest's
    two and the other's leftover denominator), else none (the lazy optimizers' blocks of lazy_rows.CHUNK_BYTES are
    not counted)."""
    if optimizer != "adamw" or fused:
        return 0
    if on_gpu:
        return int(FOREACH_ADAMW_BYTES * values)
    return int(PER_TENSOR_ADAMW_BYTES * largest[0] + PREVIOUS_DENOMINATOR_BYTES * largest[1])


@dataclasses.dataclass(frozen=True)
class HeadShard:
    ranks: tuple[int, int]  # first and last rank holding a shard of this size
    num_local: int  # classes on each of these ranks
    sharded_values: int  # elements of sharded_parameters() (C_local x D, or C_local x K x D for CHEST)
    replicated_values: int  # CHEST's shared FC h, whole on every rank
    bytes_per_value: float = HEAD_BYTES_PER_VALUE["adamw"]  # optim.head_optimizer's (head_bytes_per_value)
    largest_tensors: tuple[int, int] = (0, 0)  # elements of the two largest of those parameters (per-tensor AdamW)

    @property
    def state_bytes(self) -> int:
        return int((self.sharded_values + self.replicated_values) * self.bytes_per_value)


def head_shards(
    loss: LossConfig, num_classes: int, embed_dim: int, world_size: int, head_optimizer: str = "adamw"
) -> list[HeadShard]:
    """One entry per distinct shard size (class_range gives the first ranks one class more), counted on
    heads built on the meta device."""
    sizes = [class_range(num_classes, r, world_size)[1] for r in range(world_size)]
    out = []
    for n in sorted(set(sizes), reverse=True):
        first = sizes.index(n)
        with torch.device("meta"):
            head = build_head(loss, num_classes, embed_dim, first, world_size)
        out.append(
            HeadShard(
                (first, len(sizes) - 1 - sizes[::-1].index(n)),
                n,
                sum(p.numel() for p in head.sharded_parameters().values()),
                sum(p.numel() for p in head.replicated_parameters().values()),
                head_bytes_per_value(head_optimizer, loss.sample_rate),
                _two_largest([*head.sharded_parameters().values(), *head.replicated_parameters().values()]),
            )
        )
    return out


def _two_largest(params: list[torch.nn.Parameter]) -> tuple[int, int]:
    sizes = sorted((p.numel() for p in params), reverse=True) + [0, 0]
    return sizes[0], sizes[1]


def logit_columns(loss: LossConfig) -> float:
    """[G, *] columns per local class in one step: K proxies in each CHEST space, Partial-FC's sample rate."""
    if loss.name in ("chest", "softtriple"):
        ch = loss.chest
        spaces = 1 if loss.name == "softtriple" else int(ch.eta_e > 0) + int(ch.eta_h > 0)
        return float(ch.proxies_per_class * spaces) * loss.sample_rate
    return loss.sample_rate


def logit_bytes(global_batch: int, num_local: int, loss: LossConfig, embed_dim: int) -> int:
    """fp32 logit / distance blocks of a step, plus the gathered [G, D] embeddings and their gradient.

    With loss.class_chunk the blocks span at most that many (kept) classes at a time."""
    classes = float(num_local)
    if loss.class_chunk > 0:  # chunk kept columns = chunk / sample_rate local classes
        classes = min(classes, loss.class_chunk / loss.sample_rate)
    return int(global_batch * classes * logit_columns(loss) * 4 * LOGIT_COPIES) + global_batch * embed_dim * 4 * 2


@dataclasses.dataclass(frozen=True)
class HeadGraph:
    """What a head's training step holds beyond its table state (the head row) and the softmax's own blocks
    (the logits row), per class whose columns are in flight at once (the kept classes of the shard; with
    loss.class_chunk at most one chunk of them). Fitted to the peak resident set of one rank's two AdamW head
    steps (bench.capacity's CPU probe, glibc's mmap threshold pinned) at D = 512, K = 2, D_H = 128 and 384,
    G = 64 to 1024 and 10k to 400k classes; tests/test_estimate.py measures three of them again.

    The step peaks in one of two phases: while the [G, C] blocks are alive (early in backward: `values` bytes
    per table value of the normalised / mapped copies, `hyp` fp32 copies of the [K, D_H] mapping through
    CHEST's h, `blocks` fp32 [G, columns] blocks) or later, in the table's own backward once the blocks are
    gone (`table` bytes per table value: normalize's backward). Unchunked, the dense table gradient the head
    row counts is written only after both (4 B per value of the whole shard not yet there); the chunked node
    allocates it first.
    """

    table: float
    values: float
    hyp: float
    blocks: float


# by head family (DistArc covers ArcFace, CosFace and the plain softmax: ~12% high for ArcFace at G = 1024)
# and by whether the shard is taken whole ("exact", also Partial-FC's kept columns) or loss.class_chunk at a time
HEAD_GRAPHS = {
    ("distarc", "exact"): HeadGraph(table=20, values=8, hyp=0, blocks=7),
    ("distarc", "chunked"): HeadGraph(table=20, values=6, hyp=0, blocks=9),
    ("chest", "exact"): HeadGraph(table=0, values=4, hyp=8, blocks=7.5),
    ("chest", "chunked"): HeadGraph(table=20, values=0, hyp=3, blocks=9),
    ("softtriple", "exact"): HeadGraph(table=24, values=8, hyp=0, blocks=5),
    ("softtriple", "chunked"): HeadGraph(table=20, values=6, hyp=0, blocks=9),  # not measured: DistArc's
}
HYPHC_MAP_COPIES = 8  # Partial-FC CHEST, unchunked: HypHC maps every local proxy through h (not only the kept)


def head_graph_bytes(
    global_batch: int, num_local: int, loss: LossConfig, embed_dim: int, head_optimizer: str = "adamw"
) -> int:
    """Bytes of the head's step beyond its table state and logit_bytes' blocks (HeadGraph), at least 0."""
    family = loss.name if loss.name in ("chest", "softtriple") else "distarc"
    chunked = loss.class_chunk > 0
    graph = HEAD_GRAPHS[family, "chunked" if chunked else "exact"]
    ch = loss.chest
    k = ch.proxies_per_class if family != "distarc" else 1
    values = k * embed_dim  # table values per class
    hyp_row = 4.0 * k * ch.hyp_dim  # bytes of one class's proxies mapped through h
    through_h = ch.eta_h > 0 or ch.tau > 0 or ch.euclid_features == "head"
    if family != "chest" or not through_h:
        hyp = 0.0
    elif chunked or ch.eta_h > 0:
        hyp = hyp_row
    else:  # whole shard, no Poincare softmax: h's features of the Euclidean space are one copy; HypHC maps only
        # its triplets' rows (CHEST E-only at K = 2 and 3, 10k classes: the same peak with tau = 0.5 as with 0)
        hyp = hyp_row / graph.hyp if ch.euclid_features == "head" else 0.0
    sampled = loss.sample_rate < 1.0
    kept = num_local * min(loss.sample_rate, 1.0)
    flight = min(kept, float(loss.class_chunk)) if chunked else kept
    columns = logit_columns(loss) / min(loss.sample_rate, 1.0)  # [G, *] columns per kept class
    dense_grad = not head_optimizer.startswith("lazy_") or not sampled  # lazy at rate 1: a dense gradient
    not_yet = 4.0 * values * num_local if dense_grad and not chunked else 0.0
    inside = max(
        0.0,
        graph.table * values * flight - not_yet,
        (graph.values * values + graph.hyp * hyp + graph.blocks * 4.0 * global_batch * columns) * flight - not_yet,
    )
    outside = 4.0 * values * kept if sampled else 0.0  # the kept rows gathered out of the table
    if sampled and not chunked and family == "chest" and ch.tau > 0:
        outside += HYPHC_MAP_COPIES * hyp_row * num_local
    softmax_blocks = logit_bytes(global_batch, num_local, loss, embed_dim) - global_batch * embed_dim * 4 * 2
    return max(0, int(outside + inside) - softmax_blocks)
