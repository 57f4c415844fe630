"""The embedding network: a timm trunk (chosen by name, never downloaded) plus a linear neck.

The neck's output is the raw, unnormalised embedding: DistArc's radial term uses its norm.
"""
from __future__ import annotations

from typing import Any

import torch
import timm
from torch import nn

from model.config import ModelConfig


class EmbeddingModel(nn.Module):
    """trunk (pooled features) -> Linear neck -> embedding [B, embed_dim]."""

    def __init__(self, trunk: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.neck = nn.Linear(int(getattr(trunk, "num_features")), embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.trunk(images))


def build_backbone(cfg: ModelConfig) -> EmbeddingModel:
    """A timm model by name with its classifier removed (num_classes=0), weights local or random."""
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": cfg.in_chans}
    if cfg.drop_path_rate > 0:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.checkpoint_path:
        kwargs["checkpoint_path"] = cfg.checkpoint_path
    try:
        trunk = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ValueError(f"model.name={cfg.name!r}: {err}; list names with timm.list_models()") from err
    if cfg.grad_checkpointing:
        getattr(trunk, "set_grad_checkpointing")(True)
    return EmbeddingModel(trunk, cfg.embed_dim)
