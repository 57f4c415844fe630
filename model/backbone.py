"""The embedding network: a timm trunk (chosen by name, never downloaded) plus an optional linear neck.

The embedding is raw and unnormalised: DistArc's radial term uses its norm, CHEST's Euclidean space
its distances. With `model.neck=false` the embedding is the trunk's own pooled output (CHEST's x^E).
Local pretrained weights (e.g. an ImageNet-21k checkpoint with its 21,843-way classifier) load through
`load_trunk_weights`: timm's own reader and the model family's checkpoint filter, classifier dropped.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import timm
import torch
from torch import nn

from model.config import ModelConfig


class EmbeddingModel(nn.Module):
    """trunk (pooled features) -> Linear neck (or identity) -> embedding [B, embed_dim]."""

    def __init__(self, trunk: nn.Module, embed_dim: int, neck: bool = True) -> None:
        super().__init__()
        self.trunk = trunk
        width = output_width(trunk)
        self.neck: nn.Module = nn.Linear(width, embed_dim) if neck else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.trunk(images))


def output_width(trunk: nn.Module) -> int:
    """Features of the trunk's pooled output with its classifier removed: timm's `head_hidden_size` where the
    model has a pre-logits layer (MobileNetV3, GhostNet: 1,024 / 1,280 after a conv head on `num_features`
    channels), else `num_features`."""
    return int(getattr(trunk, "head_hidden_size", None) or getattr(trunk, "num_features"))


def timm_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The `timm.create_model` arguments that fix the trunk's architecture (shared with train/export.py)."""
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": cfg.in_chans}
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size:
        kwargs["patch_size"] = cfg.patch_size
    return kwargs


def build_backbone(cfg: ModelConfig) -> EmbeddingModel:
    """A timm model by name with its classifier removed (num_classes=0), weights local or random."""
    kwargs = timm_kwargs(cfg)
    if cfg.drop_path_rate > 0:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        trunk = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ValueError(f"model.name={cfg.name!r}: {err}; list names with timm.list_models()") from err
    except TypeError as err:  # an architecture argument this model's constructor does not have
        setting = next((k for k in ("img_size", "patch_size", "drop_path_rate") if f"'{k}'" in str(err)), None)
        if setting is None:
            raise
        raise ValueError(f"model.{setting}: {cfg.name} has no {setting} ({err}); set model.{setting}=0") from err
    width = output_width(trunk)
    if not cfg.neck and width != cfg.embed_dim:
        raise ValueError(
            f"model.neck=false makes the trunk's output the embedding, but {cfg.name} outputs {width} "
            f"features and model.embed_dim={cfg.embed_dim}; set model.embed_dim={width} "
            "(or model.neck=true for a Linear neck)"
        )
    if cfg.checkpoint_path:
        load_trunk_weights(trunk, cfg.checkpoint_path, cfg.name)
    if cfg.grad_checkpointing:
        try:
            getattr(trunk, "set_grad_checkpointing")(True)
        except AssertionError as err:  # timm's models without checkpointing assert False (VGG, Inception)
            raise ValueError(
                f"model.grad_checkpointing=true: timm's {cfg.name} cannot checkpoint its blocks ({err}); "
                "set model.grad_checkpointing=false"
            ) from err
    return EmbeddingModel(trunk, cfg.embed_dim, cfg.neck)


def check_trunk_weights(cfg: ModelConfig, where: str) -> None:
    """Refuse, before any model is built or job queued, a trunk that should start from pretrained weights
    (`model.needs_checkpoint`) but names none: it trains, from random weights, to numbers far from the paper's.
    `where` names the run in the message (a named file that is missing: load_trunk_weights)."""
    if cfg.needs_checkpoint and not cfg.checkpoint_path:
        raise ValueError(
            f"{where}: model.needs_checkpoint=true but model.checkpoint_path is empty: this recipe starts its "
            f"trunk ({cfg.name}) from pretrained weights, and from random ones it ends far from the paper's "
            "numbers. Give model.checkpoint_path=FILE (a local timm/torch/safetensors checkpoint, e.g. timm's "
            f"{cfg.name}.augreg_in21k saved with torch.save; nothing is downloaded), or model.needs_checkpoint=false "
            "to train from random weights on purpose"
        )


def _classifier_prefixes(trunk: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier(s) the pretrained checkpoint may hold (timm's pretrained_cfg)."""
    names = getattr(trunk, "pretrained_cfg", {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names) + ("head_dist.",)  # DeiT's distillation head


def load_trunk_weights(trunk: nn.Module, path: str, model_name: str) -> None:
    """Load a local checkpoint (torch or safetensors; a `state_dict`/`model` wrapper and `module.`
    prefixes are handled by timm) into `trunk`, strictly, after timm's filter for the model family
    (ViT: position embeddings resampled to the new grid, patch embeddings to the new patch size) and
    with the classifier's keys dropped. Anything else that does not fit raises ValueError naming the
    file, the first mismatching keys and the settings that fix the architecture."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.checkpoint_path={path} does not exist; give a local timm/torch checkpoint "
            "of the trunk (nothing is downloaded)"
        )
    if os.path.splitext(path)[1].lower() in (".npz", ".npy"):  # JAX/Flax weights: the model's own reader
        timm.models.load_checkpoint(trunk, path)
        return
    try:
        state = timm.models.load_state_dict(path, weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch.load / safetensors raise many types on bad files
        raise ValueError(
            f"model.checkpoint_path={path} is not a readable torch or safetensors checkpoint: {err}"
        ) from err
    filter_fn = getattr(sys.modules[type(trunk).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, trunk)
    own = trunk.state_dict()
    prefixes = _classifier_prefixes(trunk)
    dropped = [k for k in state if k not in own and k.startswith(prefixes)]
    state = {k: v for k, v in state.items() if k not in dropped}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(items)} {what}, first: {items[0]}"
            for what, items in (
                ("shape mismatches", mismatched),
                ("keys missing from the file", missing),
                ("keys the model lacks", unexpected),
            )
            if items
        ]
        raise ValueError(
            f"model.checkpoint_path={path} does not fit model.name={model_name}: {'; '.join(problems)}. "
            "Is it a checkpoint of this architecture? model.name, model.in_chans, model.img_size and "
            "model.patch_size must describe the network the file was trained as"
        )
    trunk.load_state_dict(state, strict=True)
