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
        out[lo - class_start:hi - class_start] = rows[lo - block * INIT_BLOCK:hi - block * INIT_BLOCK]
    return out


class ShardedHead(nn.Module, abc.ABC):
    """Base of the class-sharded heads: this rank's slice of a table of `num_classes` rows.

    The checkpoint writer and the evaluator rely only on these attributes and `predict`.
    """

    num_classes: int
    embed_dim: int
    class_start: int
    num_local: int

    @abc.abstractmethod
    def predict(self, emb_GD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted global class ids (one tensor per prediction rule) for a global batch."""
