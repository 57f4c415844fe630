"""Class-shard arithmetic and deterministic proxy-row initialisation.

`class_range` is the single source of which rank owns which classes; the heads, the checkpoint
writer and the tests all call it. Rows are drawn from generators keyed by *global* class id (in
blocks), so a table is bit-identical whatever the world size: this is what makes checkpoints
re-sliceable and the sharded loss comparable with a dense one.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from model.config import LossConfig

INIT_BLOCK = 4096  # classes per generator block; changing it changes every initial table


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice of classes owned by `rank`.

    Returns:
        (class_start, num_local): the first `num_classes % world_size` ranks get one extra class
        (the Partial-FC formula). Ranks beyond `num_classes` get an empty slice.
    """
    if num_classes < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad shard query: num_classes={num_classes} rank={rank} world_size={world_size}")
    base, extra = divmod(num_classes, world_size)
    num_local = base + (1 if rank < extra else 0)
    class_start = base * rank + min(rank, extra)
    return class_start, num_local


def owner_of(class_ids: torch.Tensor, num_classes: int, world_size: int) -> torch.Tensor:
    """Rank owning each global class id (the inverse of `class_range`)."""
    base, extra = divmod(num_classes, world_size)
    boundary = extra * (base + 1)  # the first `extra` ranks hold base + 1 classes each
    big = torch.div(class_ids, base + 1, rounding_mode="floor")
    small = extra + torch.div(class_ids - boundary, max(base, 1), rounding_mode="floor")
    return torch.where(class_ids < boundary, big, small)


def class_permutation(num_classes: int, seed: int) -> torch.Tensor:
    """A fixed shuffle of class ids: `perm[label]` is the table row holding `label`.

    Sharding contiguous rows of shuffled ids spreads grouped classes (SOP super-categories) over ranks.
    """
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed + 17))


def sample_local_classes(
    target_col: torch.Tensor, num_local: int, rate: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial-FC negative-class sampling on one rank.

    Args:
        target_col: [G] local column of each sample's class, -1 where another rank owns it.
        rate: fraction of the local classes to keep; the batch's positives are always kept.

    Returns:
        (index, new_target_col): sorted local columns kept, and targets renumbered into them.
        At rate 1.0 the index is every column and targets are unchanged.
    """
    if rate >= 1.0 or num_local == 0:
        return torch.arange(num_local, device=target_col.device), target_col
    num_keep = max(1, min(num_local, int(rate * num_local + 0.5)))
    score = torch.rand(num_local, generator=generator).to(target_col.device)
    positives = target_col[target_col >= 0]
    score[positives] = 2.0  # above any random score: positives always survive topk
    num_keep = max(num_keep, int(positives.unique().numel()))
    index = torch.topk(score, num_keep).indices.sort().values
    new_target = torch.where(target_col >= 0, torch.searchsorted(index, target_col.clamp_min(0)), target_col)
    return index, new_target


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Refuse labels outside [0, num_classes), naming data.num_classes. Host tensors: checked at once. On a GPU
    an asynchronous device-side assert: reading the labels back would stall every step between the trunk's
    forward and the head until the forward had run (the data stream skips and counts such labels anyway)."""
    if not labels.numel():
        return
    if labels.device.type == "cpu":
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels outside [0, {num_classes}): min {low}, max {high}; "
                "set data.num_classes to the data set's class count"
            )
        return
    inside = ((labels >= 0) & (labels < num_classes)).all()
    torch._assert_async(
        inside, f"labels outside [0, {num_classes}): set data.num_classes to the data set's class count"
    )


def init_rows(seed: int, class_start: int, num_local: int, row_shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal rows for classes [class_start, class_start + num_local), fp32.

    Row c depends only on (seed, c): blocks of INIT_BLOCK classes share one generator.
    """
    out = torch.empty((num_local, *row_shape), dtype=torch.float32)
    if num_local == 0:
        return out
    first_block = class_start // INIT_BLOCK
    last_block = (class_start + num_local - 1) // INIT_BLOCK
    for block in range(first_block, last_block + 1):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.randn((INIT_BLOCK, *row_shape), generator=gen)
        lo = max(class_start, block * INIT_BLOCK)
        hi = min(class_start + num_local, (block + 1) * INIT_BLOCK)
        out[lo - class_start : hi - class_start] = rows[lo - block * INIT_BLOCK : hi - block * INIT_BLOCK]
    return out


class ShardedHead(nn.Module, abc.ABC):
    """Base of the class-sharded heads: this rank's slice of a table of `num_classes` rows.

    The checkpoint writer and the evaluator rely only on these attributes and `predict`.
    """

    cfg: LossConfig
    num_classes: int
    embed_dim: int
    class_start: int
    num_local: int
    # Partial-FC's gather of the sampled rows gives the table a row-sparse gradient (only those rows) instead
    # of a dense one, zero elsewhere; set by train.engine.build_head_optimizer for the lazy optimizers
    sparse_row_grads: bool = False

    @abc.abstractmethod
    def predict(self, emb_GD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted global class ids (one tensor per prediction rule) for a global batch."""

    @abc.abstractmethod
    def sharded_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters whose dim 0 is this rank's class slice (saved and re-sliced by class range)."""

    def embed_spaces(self, emb_GD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embeddings to evaluate retrieval on, by metric name ("euclidean", "cosine", "poincare")."""
        return {"euclidean": emb_GD.float(), "cosine": emb_GD.float()}

    def replicated_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters every rank holds whole; their gradients are summed over ranks before a step."""
        return {}
