"""MetricLearningTask: backbone -> embeddings -> sharded head -> {"loss", parts}.

The training loop only sees the dict contract; it never knows which loss is inside.
"""

from __future__ import annotations

from typing import Callable

import torch

from model.chest import ChestHead
from model.config import LossConfig
from model.distarc import DistArcHead
from model.proxies import ShardedHead


def build_head(
    cfg: LossConfig,
    num_classes: int,
    embed_dim: int,
    rank: int = 0,
    world_size: int = 1,
    embedding_grad_scale: float = 1.0,
) -> ShardedHead:
    """The class-sharded head named by `cfg.name` (DistArc and its baselines, or CHEST / SoftTriple)."""
    cls = ChestHead if cfg.name in ("chest", "softtriple") else DistArcHead
    return cls(cfg, num_classes, embed_dim, rank, world_size, embedding_grad_scale=embedding_grad_scale)


class MetricLearningTask:
    """Couples the (possibly DeepSpeed-wrapped) backbone with a class-sharded head.

    The backbone is whatever callable maps images to embeddings (the DeepSpeed engine in training);
    the head owns its shard and computes the global loss. Not an nn.Module on purpose: the two halves
    have different optimizers and different gradient reductions.
    """

    def __init__(self, backbone: Callable[[torch.Tensor], torch.Tensor], head: ShardedHead) -> None:
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        emb = self.backbone(images)
        # the head's maths is fp32 (docs/losses.md 4.4) even where a caller wraps the step in autocast: bf16
        # autocast moved CHEST's embedding gradient by 6e-2 relative, ArcFace at s = 64 by 5e-3
        with torch.autocast(emb.device.type, enabled=False):
            return self.head(emb.float(), labels, step=step)

    __call__ = forward

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images).float()
