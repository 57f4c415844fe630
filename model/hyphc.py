"""CHEST's hyperbolic hierarchical-clustering regulariser (HypHC, docs/losses.md 2.5-2.6): the step's proxy
triplets, one per anchor class and identical on every rank, and the per-triplet loss.

Negatives come from a rotating peer rank ("peer", docs/losses.md 3.4 b) or the anchor's own shard ("local");
model.chest exchanges and maps the rows.
"""

from __future__ import annotations

import dataclasses

import torch

from common.seeds import stable_seed
from model import hyperbolic as hyp
from model.config import ChestConfig
from model.proxies import class_range, owner_of


def hyphc_triplet_loss(p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor, cfg: ChestConfig) -> torch.Tensor:
    """Eq. 8-9 per triplet: sum over the 3 pairs of S_ab (1 - softmax_pairs(sign * d_ab / gamma))."""
    c = cfg.curvature
    d = torch.stack([hyp.dist(p1, p2, c), hyp.dist(p1, p3, c), hyp.dist(p2, p3, c)], dim=1)  # [T, 3]
    sim = torch.exp(-d)
    if cfg.hyphc_detach_sim:
        sim = sim.detach()
    sigma = torch.softmax(cfg.hyphc_sign * d / cfg.gamma_hyp, dim=1)
    return (sim * (1 - sigma)).sum(dim=1)


# Anchor classes per random stream: a rank draws only the blocks its own anchors (and its peer's) fall in,
# O(C/P + block) per step instead of O(C) (5M classes: 1.1 s of CPU per step for every rank).
TRIPLET_BLOCK = 8192


@dataclasses.dataclass
class Triplets:
    """One proxy triplet per anchor class in `anchors` (global ids; tensors indexed by anchor - anchors.start):
    (c, i), (c, j), (neg_class, neg_k)."""

    anchors: range
    pos_i: torch.Tensor  # [A]
    pos_j: torch.Tensor  # [A]
    neg_class: torch.Tensor  # [A]
    neg_k: torch.Tensor  # [A]
    valid: torch.Tensor  # [A] bool: a negative exists for this anchor
    offset: int  # rotating-peer offset t (0 = local negatives)


def sample_triplets(
    num_classes: int,
    num_proxies: int,
    world_size: int,
    seed: int,
    step: int,
    mode: str,
    anchors: range | None = None,
) -> Triplets:
    """The step's triplets for the anchor classes `anchors` (default: all), a pure function of the arguments:
    every rank that asks for an anchor gets the same triplet, whatever else it asks for.

    "peer": the negative class lives on rank (owner - t) mod P for one shared random t in 1..P-1,
    so each rank receives its negatives from a single peer. "local" (or P = 1): the negative class
    is drawn from the anchor's own rank, excluding the anchor class. The draws come in fixed blocks of
    TRIPLET_BLOCK anchors, each from its own seed, so a rank pays for its own classes only.
    """
    anchors = range(num_classes) if anchors is None else anchors
    if anchors.step != 1 or anchors.start < 0 or anchors.stop > num_classes:
        raise ValueError(f"anchors {anchors} is not a contiguous range of the {num_classes} classes")
    k = num_proxies
    pos_i, pos_j, u, neg_k = _anchor_draws(num_classes, k, seed, step, anchors)
    c = torch.arange(anchors.start, anchors.stop)
    owner = owner_of(c, num_classes, world_size)
    # every rank's (class_start, num_local): the shard layout the heads use
    starts, sizes = torch.tensor([class_range(num_classes, r, world_size) for r in range(world_size)]).unbind(1)
    if mode == "peer" and world_size > 1:
        gen = torch.Generator().manual_seed(stable_seed(seed, step, "triplet-peer"))
        offset = 1 + int(torch.randint(world_size - 1, (1,), generator=gen))
        sender = (owner - offset) % world_size
        n = sizes[sender]
        neg_class = starts[sender] + torch.floor(u * n.to(torch.float64)).long().clamp_max((n - 1).clamp_min(0))
        valid = n > 0
    else:
        offset = 0
        n = sizes[owner]
        shift = 1 + torch.floor(u * (n - 1).clamp_min(1).to(torch.float64)).long()
        neg_class = starts[owner] + (c - starts[owner] + shift) % n.clamp_min(1)
        valid = n > 1
    return Triplets(anchors, pos_i, pos_j, neg_class, neg_k, valid, offset)


def _anchor_draws(
    num_classes: int, k: int, seed: int, step: int, anchors: range
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pos_i, pos_j, u, neg_k) of `anchors`: the blocks they fall in drawn whole, each from its own seed."""
    if len(anchors) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0, dtype=torch.float64), empty
    first, stop = anchors.start // TRIPLET_BLOCK, -(-anchors.stop // TRIPLET_BLOCK)
    parts: list[tuple[torch.Tensor, ...]] = []
    for block in range(first, stop):
        size = min(TRIPLET_BLOCK, num_classes - block * TRIPLET_BLOCK)
        gen = torch.Generator().manual_seed(stable_seed(seed, step, "triplets", block))
        pos_i = torch.randint(k, (size,), generator=gen)
        pos_j = (pos_i + 1 + torch.randint(max(k - 1, 1), (size,), generator=gen)) % k
        u = torch.rand(size, generator=gen, dtype=torch.float64)
        parts.append((pos_i, pos_j, u, torch.randint(k, (size,), generator=gen)))
    lo = anchors.start - first * TRIPLET_BLOCK
    drawn = [torch.cat(column)[lo : lo + len(anchors)] for column in zip(*parts)]
    return drawn[0], drawn[1], drawn[2], drawn[3]
