"""DeepSpeed for the backbone, a plain optimizer for the sharded head.

The engine owns only the backbone: ZeRO averages its gradients over ranks, which the head's
all-gather backward makes up for (x world size). The head's rows differ per rank and must never be
averaged or partitioned, so they stay outside the engine with their own AdamW and schedule
(docs/infra-lessons.md 0.1 and 2.2).
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from model.proxies import ShardedHead
from train import zero3_local_fetch
from train.blocks import compile_trunk, mark_leaf_blocks
from train.config import OptimConfig, ZeroConfig
from train.fused_grad_checks import install as fuse_gradient_checks
from train.lazy_rows import LazyRowAdamW, LazyRowSGD
from train.schedule import lr_factor


def deepspeed_config(
    optim: OptimConfig, zero: ZeroConfig, micro_batch: int, load_universal: bool = False
) -> dict[str, Any]:
    """The DeepSpeed JSON config generated from our typed config (no hand-written JSON files).

    `load_universal`: the engine will load a universal checkpoint (a resume at another world size).
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum_steps,
        "zero_optimization": {
            "stage": zero.stage,
            "overlap_comm": zero.overlap_comm,
            "reduce_bucket_size": zero.reduce_bucket_size,
            "allgather_bucket_size": zero.allgather_bucket_size,
        },
        "steps_per_print": 10**9,  # our TensorBoardLogger reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if zero.stage == 3:
        cfg["zero_optimization"].update(
            stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
            stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
            stage3_max_reuse_distance=zero.stage3_max_reuse_distance,
            stage3_max_live_parameters=zero.stage3_max_live_parameters,
        )
    # always written: DeepSpeed's default when the key is absent is 1.0, i.e. "off" would clip at norm 1
    cfg["gradient_clipping"] = optim.grad_clip
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    if zero.bf16:
        # fp32 gradient accumulation: bf16 sums over many micro-batches lose low bits
        cfg["bf16"] = {"enabled": True}
        # buffers in bf16 too (DeepSpeed >= 0.19 keeps them fp32 unless told): BatchNorm needs its running
        # statistics in the dtype of its weight and input
        cfg["data_types"] = {"grad_accum_dtype": "fp32", "buffer_dtype": "bf16"}
    return cfg


# How the backbone's parameters split into AdamW groups, recorded in every checkpoint's meta.json: a resume
# must rebuild the groups its ZeRO optimizer state was saved with. "ndim": 1-D tensors only (checkpoints
# written before 2026-12-06, which lack the key); "timm": also what no_weight_decay() names.
DECAY_GROUPS = ("timm", "ndim")


def no_weight_decay_patterns(module: nn.Module) -> set[str]:
    """fnmatch patterns of parameter names (as module.named_parameters gives them) from every submodule's
    `no_weight_decay()`: timm's ViTs list pos_embed, cls_token and the register tokens, Swin its
    relative-position tables, XCiT 'pos_embed.*' (timm matches them with fnmatch too)."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        listed = getattr(sub, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names


def param_groups(
    module: nn.Module, weight_decay: float, decay_groups: str = "timm", layer_decay: float = 1.0, lr: float = 1.0
) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights (every 1-D tensor) and, with decay_groups="timm",
    on what the trunk's `no_weight_decay()` names (timm's `param_groups_weight_decay`); groups in this order
    (train/elastic.py restores them by position).

    layer_decay < 1: a decay and a no-decay group per layer of `module.trunk` (timm's `param_groups_layer_decay`,
    layers from the trunk's group_matcher), each at lr x its `lr_scale`, the top layer's (scale 1, with the
    neck) first, so the engine's reported lr (group 0's) is optim.lr's schedule."""
    if decay_groups not in DECAY_GROUPS:
        raise ValueError(f"decay_groups={decay_groups!r} must be one of {DECAY_GROUPS} (a checkpoint's meta.json)")
    patterns = no_weight_decay_patterns(module) if decay_groups == "timm" else set()

    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim <= 1 or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)

    if layer_decay < 1.0:
        return _layer_decay_groups(module, weight_decay, layer_decay, lr, exempt)
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if not exempt(n, p)]
    no_decay = [p for n, p in params if exempt(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _layer_decay_groups(
    module: nn.Module, weight_decay: float, layer_decay: float, lr: float, exempt: Callable[[str, torch.Tensor], bool]
) -> list[dict[str, Any]]:
    """param_groups' per-layer groups: timm assigns the trunk's parameters to layers; the rest (the neck) is
    the top layer."""
    from timm.optim import param_groups_layer_decay

    trunk = getattr(module, "trunk", None)
    if not isinstance(trunk, nn.Module):
        raise ValueError(f"optim.layer_decay needs the embedding model's trunk; {type(module).__name__} has none")
    prefix = "trunk."
    exempt_in_trunk = [n for n, p in trunk.named_parameters() if exempt(prefix + n, p)]
    groups = param_groups_layer_decay(
        trunk, weight_decay, no_weight_decay_list=exempt_in_trunk, layer_decay=layer_decay
    )
    if len({g["lr_scale"] for g in groups}) == 1:
        raise ValueError(
            f"optim.layer_decay={layer_decay}: timm puts every parameter of {type(trunk).__name__} in one layer "
            "(no group_matcher); set optim.layer_decay=1"
        )
    trunk_ids = {id(p) for p in trunk.parameters()}
    rest = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in trunk_ids]
    groups += [
        {"params": [p for n, p in rest if not exempt(n, p)], "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": [p for n, p in rest if exempt(n, p)], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    groups = sorted((g for g in groups if g["params"]), key=lambda g: -g["lr_scale"])  # stable: timm's order within
    return [{**g, "lr": lr * g["lr_scale"]} for g in groups]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that leaves its parameters and moments untouched on a step the caller marked `skip` (a
    non-finite loss or head gradient on some rank, train/step.py) or whose gradients are not finite.

    Non-finite backbone gradients are caught collectively before this step is reached: ZeRO stages 1-3
    and DeepSpeed's bf16 optimizer test the global gradient norm and skip the step themselves
    (`engine.was_step_applied()`). At stage 0 in fp32 DeepSpeed tests nothing, and the gradients this
    optimizer sees are the all-reduced ones, identical on every rank, so its own test here agrees
    everywhere; `test_gradients` (set by build_engine) turns that test on there only, so no step pays for
    it twice. ZeRO-1/2 call `step` once per parameter group; `skipped` covers all of them.
    """

    def __init__(self, *args: Any, test_gradients: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.test_gradients = test_gradients
        self.skip = False  # set by the caller before the engine's step
        self.skipped = False  # whether the last boundary's update was left out here

    def _gradients_finite(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.skip or (self.test_gradients and not self._gradients_finite()):
            self.skipped = True
            return None
        return super().step(closure)


def _schedule(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    fn = functools.partial(
        lr_factor, warmup_steps=optim.warmup_steps, max_steps=max_steps, min_ratio=optim.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_engine(
    backbone: nn.Module,
    optim: OptimConfig,
    zero: ZeroConfig,
    micro_batch: int,
    max_steps: int,
    load_universal: bool = False,
    compile_scope: str = "",
    decay_groups: str = "timm",
    layer_decay: float | None = None,
) -> Any:
    """`deepspeed.initialize` over the backbone with a torch AdamW client optimizer (GuardedAdamW), its
    optimizer reachable as `engine.client_optimizer`; `compile_scope` ("blocks" or "model"; "" for none):
    what `compile_trunk` compiles.

    A client optimizer needs no compiled op, so CPU machines start in seconds. `decay_groups` and `layer_decay`
    (default optim.layer_decay) shape the optimizer's groups: a resume passes its checkpoint's.
    """
    layer_decay = optim.layer_decay if layer_decay is None else layer_decay
    import deepspeed
    import deepspeed.ops

    # The CPU accelerator would JIT-compile a shared-memory all-reduce (45-110 s on 2 cores);
    # gloo is enough for our sizes.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # ZeRO accepts optimizers it lists by exact type; GuardedAdamW is torch's AdamW plus a skip test
    # (DeepSpeed extends the same list for its Muon optimizer)
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    if GuardedAdamW not in ZERO_SUPPORTED_OPTIMIZERS:
        ZERO_SUPPORTED_OPTIMIZERS.append(GuardedAdamW)
    optimizer = GuardedAdamW(
        param_groups(backbone, optim.weight_decay, decay_groups, layer_decay, optim.lr),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        fused=optim.fused or None,
        test_gradients=zero.stage == 0 and not zero.bf16,  # the one case DeepSpeed does not test itself
    )
    scheduler = _schedule(optimizer, optim, max_steps)
    if zero.stage == 3 and zero.stage3_leaf_blocks:
        mark_leaf_blocks(backbone)  # before initialize, which registers ZeRO-3's hooks
    engine, _, _, _ = deepspeed.initialize(
        model=backbone,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(optim, zero, micro_batch, load_universal),
    )
    if zero.fused_grad_checks:
        fuse_gradient_checks(engine.optimizer)
    if zero.stage == 3:
        zero3_local_fetch.enable(engine.module, zero.stage3_skip_local_fetch_sync)
    if compile_scope:
        compiled = compile_trunk(engine, compile_scope)
        if engine.global_rank == 0:
            print(f"model.compile (compile_scope={compile_scope}): compiles {compiled}", flush=True)
    return engine


def embedding_grad_scale(engine: Any) -> float:
    """What the head's all-gather backward multiplies the embedding gradients by: the number of ranks
    DeepSpeed averages the backbone's gradients over (its data-parallel world size). Every rank's loss is
    a part of the global loss, so the backbone needs the *sum* of the parts' gradients; the engine's mean
    divides by this count, the head multiplies it back (docs/design.md, "Gradient bookkeeping")."""
    return float(engine.dp_world_size)


def build_head_optimizer(
    head: ShardedHead, optim: OptimConfig, max_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (or SGD with momentum: optim.head_optimizer) over this rank's shard (optim.head_lr,
    optim.head_weight_decay) and, for CHEST, over the replicated shared FC h (optim.fc_lr, default the
    backbone's lr, with the backbone's weight decay on its matrix), all with the backbone's schedule shape."""
    groups: list[dict[str, Any]] = [
        {
            "params": list(head.sharded_parameters().values()),
            "lr": optim.head_lr,
            "weight_decay": optim.head_weight_decay,
        }
    ]
    replicated = list(head.replicated_parameters().values())
    if replicated:
        fc_lr = optim.fc_lr or optim.lr
        groups += [
            {"params": [p for p in replicated if p.ndim > 1], "lr": fc_lr, "weight_decay": optim.weight_decay},
            {"params": [p for p in replicated if p.ndim <= 1], "lr": fc_lr, "weight_decay": 0.0},
        ]
    # fused (optim.fused): no temporaries; unfused, the step holds one table-sized temporary (foreach, on GPUs) or
    # two (per tensor, on CPU: 150k x 512 fp32 1.72 GiB against 1.15), which caps the table (launch.head_memory)
    kept = [g for g in groups if g["params"]]
    optimizer: torch.optim.Optimizer
    lazy = optim.head_optimizer.startswith("lazy_")
    if lazy and replicated:
        raise ValueError(f"optim.head_optimizer={optim.head_optimizer} is for DistArc-family heads (no shared FC)")
    # the lazy optimizers read which rows a step sampled from the gradient's sparsity (train/lazy_rows.py)
    head.sparse_row_grads = lazy
    if optim.head_optimizer == "lazy_adamw":
        optimizer = LazyRowAdamW(kept, lr=optim.head_lr, betas=(optim.beta1, optim.beta2))
    elif optim.head_optimizer == "lazy_sgd":
        optimizer = LazyRowSGD(kept, lr=optim.head_lr, momentum=optim.head_momentum)
    elif optim.head_optimizer == "sgd":  # Partial FC's choice: one momentum row per class instead of two moments
        optimizer = torch.optim.SGD(kept, lr=optim.head_lr, momentum=optim.head_momentum, fused=optim.fused or None)
    else:
        optimizer = torch.optim.AdamW(kept, betas=(optim.beta1, optim.beta2), fused=optim.fused or None)
    return optimizer, _schedule(optimizer, optim, max_steps)
