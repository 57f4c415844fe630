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


@dataclasses.dataclass
class Triplets:
    """One proxy triplet per anchor class (global ids): (c, i), (c, j), (neg_class, neg_k)."""

    pos_i: torch.Tensor  # [C]
    pos_j: torch.Tensor  # [C]
    neg_class: torch.Tensor  # [C]
    neg_k: torch.Tensor  # [C]
    valid: torch.Tensor  # [C] bool: a negative exists for this anchor
    offset: int  # rotating-peer offset t (0 = local negatives)


def sample_triplets(num_classes: int, num_proxies: int, world_size: int, seed: int, step: int, mode: str) -> Triplets:
    """The step's triplets, identical on every rank (a pure function of its arguments).

    "peer": the negative class lives on rank (owner - t) mod P for one shared random t in 1..P-1,
    so each rank receives its negatives from a single peer. "local" (or P = 1): the negative class
    is drawn from the anchor's own rank, excluding the anchor class.
    """
    gen = torch.Generator().manual_seed(stable_seed(seed, step, "triplets"))
    c = torch.arange(num_classes)
    k = num_proxies
    pos_i = torch.randint(k, (num_classes,), generator=gen)
    pos_j = (pos_i + 1 + torch.randint(max(k - 1, 1), (num_classes,), generator=gen)) % k
    u = torch.rand(num_classes, generator=gen, dtype=torch.float64)
    neg_k = torch.randint(k, (num_classes,), generator=gen)
    owner = owner_of(c, num_classes, world_size)
    # every rank's (class_start, num_local): the shard layout the heads use
    starts, sizes = torch.tensor([class_range(num_classes, r, world_size) for r in range(world_size)]).unbind(1)
    if mode == "peer" and world_size > 1:
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
    return Triplets(pos_i, pos_j, neg_class, neg_k, valid, offset)
