"""DeepSpeed for the backbone, a plain optimizer for the sharded head.

The engine owns only the backbone: ZeRO averages its gradients over ranks, which the head's
all-gather backward makes up for (x world size). The head's rows differ per rank and must never be
averaged or partitioned, so they stay outside the engine with their own AdamW and schedule
(infra-lessons 0.1 and 2.2).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from model.proxies import ShardedHead
from train.config import OptimConfig, ZeroConfig
from train.schedule import lr_factor


def deepspeed_config(optim: OptimConfig, zero: ZeroConfig, micro_batch: int,
                     load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config generated from our typed config (no hand-written JSON files).

    `load_universal`: the engine will load a universal checkpoint (a resume at another world size).
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum_steps,
        "zero_optimization": {"stage": zero.stage},
        "steps_per_print": 10**9,  # our MetricLogger reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if optim.grad_clip > 0:
        cfg["gradient_clipping"] = optim.grad_clip
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    if zero.bf16:
        # fp32 gradient accumulation: bf16 sums over many micro-batches lose low bits
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights (every 1-D tensor)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    fn = functools.partial(lr_factor, warmup_steps=optim.warmup_steps, max_steps=max_steps,
                           min_ratio=optim.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_engine(backbone: nn.Module, optim: OptimConfig, zero: ZeroConfig, micro_batch: int,
                 max_steps: int, load_universal: bool = False) -> Any:
    """`deepspeed.initialize` over the backbone with a torch AdamW client optimizer.

    A client optimizer needs no compiled op, so CPU machines start in seconds.
    """
    import deepspeed
    import deepspeed.ops

    # The CPU accelerator would JIT-compile a shared-memory all-reduce (45-110 s on 2 cores);
    # gloo is enough for our sizes.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    optimizer = torch.optim.AdamW(param_groups(backbone, optim.weight_decay), lr=optim.lr,
                                  betas=(optim.beta1, optim.beta2))
    scheduler = _schedule(optimizer, optim, max_steps)
    engine, _, _, _ = deepspeed.initialize(model=backbone, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(optim, zero, micro_batch, load_universal))
    return engine


def build_head_optimizer(head: ShardedHead, optim: OptimConfig, max_steps: int
                         ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over this rank's shard (optim.head_lr, optim.head_weight_decay) and, for CHEST, over the
    replicated shared FC h (optim.fc_lr, default the backbone's lr, with the backbone's weight decay
    on its matrix), all with the backbone's schedule shape."""
    groups: list[dict[str, Any]] = [{"params": list(head.sharded_parameters().values()), "lr": optim.head_lr,
                                     "weight_decay": optim.head_weight_decay}]
    replicated = list(head.replicated_parameters().values())
    if replicated:
        fc_lr = optim.fc_lr or optim.lr
        groups += [{"params": [p for p in replicated if p.ndim > 1], "lr": fc_lr, "weight_decay": optim.weight_decay},
                   {"params": [p for p in replicated if p.ndim <= 1], "lr": fc_lr, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(optim.beta1, optim.beta2))
    return optimizer, _schedule(optimizer, optim, max_steps)
