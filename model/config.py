"""Configuration of the backbone (`ModelConfig`) and of the loss head (`LossConfig`).

Both are plain typed dataclasses; `train.config.RunConfig` composes them. Each `validate()` raises
`ValueError` naming the setting and what to change.
"""
from __future__ import annotations

import dataclasses
import math

HEAD_NAMES = ("distarc", "arcface", "cosface", "softmax")
DISTARC_FORMS = ("paper", "official")


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """The embedding network: a timm trunk chosen by name plus a linear neck to `embed_dim`."""

    name: str = "resnet10t"  # any timm model name; vit_large_patch16_224 for the full-size runs
    embed_dim: int = 64
    in_chans: int = 3
    img_size: int = 0  # passed to timm for ViTs (0 = the model's default); CNNs ignore it
    patch_size: int = 0  # override a ViT's patch size for small images (0 = the model's default)
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    checkpoint_path: str = ""  # optional local timm/torch state dict to start the trunk from

    def validate(self) -> None:
        if not self.name:
            raise ValueError("model.name is empty: give a timm model name, e.g. model.name=resnet10t")
        if self.embed_dim < 1:
            raise ValueError(f"model.embed_dim={self.embed_dim} must be >= 1")
        if self.in_chans not in (1, 3):
            raise ValueError(f"model.in_chans={self.in_chans} must be 1 or 3")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate={self.drop_path_rate} must be in [0, 1)")


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    """The class-sharded margin head.

    `name` picks the head: "distarc" (HyperSpaceX), or its special cases "arcface" (lambda = mu = 0),
    "cosface" (additive cosine margin) and "softmax" (plain linear softmax). Symbols follow
    shared/spec/losses.md section 1.
    """

    name: str = "distarc"
    form: str = "paper"  # "paper" (Eq. 1, symmetric softmax) or "official" (released code: CE(z_den) + lambda*delta_y)
    scale: float = 1.0  # s
    margin: float = 0.5  # m, radians (additive angular) or cosine units (cosface)
    margin_warmup_steps: int = 0  # m grows linearly from 0 over this many optimizer steps
    radial_weight: float = 0.005  # lambda
    phi_weight: float = 1.0  # mu, switch (or weight) of the cos(phi) term
    radius_start: float = 10.0  # r_0
    radius_gap: float = 10.0  # g
    num_spheres: int = 10  # S; class j lives on sphere j mod S
    theta_guard: bool = False  # ArcFace's fallback cos(theta) - m sin(m) when theta + m > pi
    init_seed: int = 1234  # rows are drawn from a generator keyed by (init_seed, global class id)

    def validate(self) -> None:
        if self.name not in HEAD_NAMES:
            raise ValueError(f"loss.name={self.name!r} is unknown; choose one of {HEAD_NAMES}")
        if self.form not in DISTARC_FORMS:
            raise ValueError(f"loss.form={self.form!r} is unknown; choose one of {DISTARC_FORMS}")
        if self.name in ("distarc", "arcface") and not 0.0 <= self.margin < math.pi / 2:
            raise ValueError(f"loss.margin={self.margin} must be in [0, pi/2) for an angular margin")
        if self.scale <= 0:
            raise ValueError(f"loss.scale={self.scale} must be > 0")
        if self.radial_weight < 0:
            raise ValueError(f"loss.radial_weight={self.radial_weight} must be >= 0")
        if self.num_spheres < 1:
            raise ValueError(f"loss.num_spheres={self.num_spheres} must be >= 1")
        if self.radius_start <= 0 or self.radius_gap < 0:
            raise ValueError("loss.radius_start must be > 0 and loss.radius_gap >= 0 (radii must be positive)")
        if self.margin_warmup_steps < 0:
            raise ValueError(f"loss.margin_warmup_steps={self.margin_warmup_steps} must be >= 0")
