"""The trunk's memory per rank, for `launch.estimate`: its parameter count (built on the meta device), its
weights, gradients and AdamW states under each ZeRO stage (a closed form of the tensors real DeepSpeed engines
hold; DeepSpeed's own estimator counts less), DeepSpeed's gradient bucket, and its activations (bytes autograd
saves for backward on a short CPU forward, scaled to the micro-batch)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
from typing import Any, Callable, Iterator
from unittest import mock

import timm
import torch
import torch.utils.checkpoint
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from model.backbone import EmbeddingModel, build_backbone, timm_kwargs
from model.config import ModelConfig
from train.config import RunConfig, ZeroConfig
from train.blocks import trunk_blocks

MEASURE_BATCH = 2  # images of the CPU forward; activations scale linearly from here
DEPTH_PROBES = (2, 3)  # ViT-like trunks: measured at these depths and extrapolated (block 0 has no drop path)

ALL_STAGES = (0, 1, 2, 3)
FLAT_ALLREDUCE = 4  # "partitioned from" of DeepSpeed's flat all-reduce copies: no stage partitions them
# Bytes per trunk parameter held per rank: (part, bytes, the stages that hold it, the first stage that partitions
# it over the ranks). Each number is the most of the tensors alive during the forward, the backward and the
# optimizer step of real DeepSpeed engines on CPU, from the second step on (tests/test_estimate.py; an audit
# measured every dtype x stage at 1, 2 and 4 ranks); DeepSpeed's own estimator counts less at bf16 ZeRO-1/3.
BF16_PARTS = (
    ("bf16 weights", 2, ALL_STAGES, 3),
    ("bf16 gradients", 2, (0, 1, 2), 2),
    ("fp32 gradient partition", 4, ALL_STAGES, 2),
    ("fp32 master weights", 4, ALL_STAGES, 1),
    ("fp32 AdamW moments", 8, ALL_STAGES, 1),
    # BF16_Optimizer (ZeRO-1) all-reduces its fp32 gradient buffers through the engine's flat bucket
    # (deepspeed/runtime/engine.py allreduce_bucket: flatten, then a cast to the bf16 communication dtype)
    ("flat all-reduce copy of the gradients (fp32, and bf16 to send)", 6, (1,), FLAT_ALLREDUCE),
    # stage 3's step flattens the gradient partition into a new fp32 tensor (stage3.py, averaged_gradients)
    ("flat fp32 copy of the gradient partition at the step", 4, (3,), 3),
)
# In fp32, ZeRO stages 1-3 still clone an fp32 master partition of the (already fp32) weights for the optimizer
# (deepspeed/runtime/zero/stage_1_and_2.py, single_partition_of_fp32_groups) and step it on a second, flat copy
# of the reduced gradient partition; stage 1 reduces the gradients only after the backward, so every rank holds
# them whole until then. Stage 0 all-reduces a flat copy of every gradient (engine.allreduce_bucket), one rank
# too: 20 B per parameter at stage 0, 8 + 16/N at stage 1, 4 + 20/N at stage 2, 24/N at stage 3 (plus what it
# gathers, below).
FP32_PARTS = (
    ("fp32 weights", 4, ALL_STAGES, 3),
    ("fp32 gradients (whole through the backward below stage 2)", 4, ALL_STAGES, 2),
    ("fp32 AdamW moments", 8, ALL_STAGES, 1),
    ("fp32 master copy of the weights' partition", 4, (1, 2, 3), 1),
    ("fp32 gradient of the master partition", 4, (1, 2, 3), 1),
    ("flat all-reduce copy of the gradients", 4, (0,), FLAT_ALLREDUCE),
)
# Parts that DeepSpeed allocates in buckets of at most this many elements (MEMORY_OPT_ALLREDUCE_SIZE)
FLAT_ALLREDUCE_ELEMENTS = 500_000_000
# ZeRO-3 on 2+ ranks: from the second step on, DeepSpeed keeps parameters it gathered in the forward until the
# backward uses them again (zero3_kept_elements), while the step-only flat copy is gone; plus the gathered layer's
# buffers (bytes per parameter of the largest layer; 4 at one rank, where nothing is gathered).
ZERO3_LAYER_BYTES = {True: 10, False: 16}  # by bf16
# bf16 ZeRO-2: a layer-sized temporary of about 6 B per parameter of the largest layer (measured, < 5% of real
# trunks' states)
ZERO2_BF16_LAYER_BYTES = 6


def zero3_kept_elements(params: int, largest_layer: int, zero: ZeroConfig, leaf_blocks: bool = False) -> int:
    """Elements of the trunk ZeRO-3 keeps gathered from the forward to the backward (measured on 2-4 CPU ranks
    over reuse distances, live-parameter caps and prefetch buckets; tests/test_estimate.py).

    Two things keep a parameter: its next use lies within stage3_max_reuse_distance elements of the trace
    (forward, then backward in reverse: the last R/2 elements of the trunk, plus the layer at the turn), and
    the prefetcher, which from the forward's last layers on walks into the backward's part of the trace and
    keeps (or gathers again) what it meets there, up to stage3_max_live_parameters (with buckets of two layers
    or more it reached the cap; smaller buckets kept less). DeepSpeed's defaults (1e9, 1e9) keep the whole of
    any trunk below 1e9 parameters. With the trunk's blocks as leaf modules (`leaf_blocks`; `largest_layer` is
    then the largest block) the reuse distance keeps about twice as much: the last R elements (measured: R = P/2
    kept 0.64 P, R = P all).
    """
    reach = zero.stage3_max_reuse_distance if leaf_blocks else zero.stage3_max_reuse_distance // 2
    by_reuse = reach + largest_layer if zero.stage3_max_reuse_distance > 0 else 0
    by_prefetch = zero.stage3_max_live_parameters if zero.stage3_prefetch_bucket_size > 0 else 0
    return min(params, max(by_reuse, by_prefetch))


@dataclasses.dataclass(frozen=True)
class TrunkSize:
    params: int
    largest_layer: int  # parameters of the largest single module (its own, not its children's)
    depth: int  # len(trunk.blocks) for ViT-like trunks, 0 otherwise
    largest_block: int = 0  # parameters of the largest of those blocks (0 without blocks)

    def gathered_unit(self, zero: ZeroConfig) -> int:
        """The layer-sized unit the states' layer terms count: at ZeRO-3 a whole block with
        zero.stage3_leaf_blocks (gathered at once), else the largest layer."""
        leaf_blocks = zero.stage == 3 and zero.stage3_leaf_blocks
        return max(self.largest_layer, self.largest_block if leaf_blocks else 0)

    def zero3_kept(self, zero: ZeroConfig) -> int:
        """zero3_kept_elements of this trunk under `zero`."""
        leaf_blocks = zero.stage3_leaf_blocks and self.largest_block > 0
        return zero3_kept_elements(self.params, self.gathered_unit(zero), zero, leaf_blocks)


def trunk_size(cfg: ModelConfig) -> TrunkSize:
    """Parameter counts of `build_backbone(cfg)` built on the meta device (no weights allocated)."""
    with torch.device("meta"):
        model = build_backbone(dataclasses.replace(cfg, checkpoint_path=""))  # nothing to load into meta tensors
    # parameters() yields a shared parameter once; DeepSpeed's model_to_params dedups by data_ptr, which is 0
    # for every meta tensor, so its *_all_live estimators cannot take a meta model.
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    largest_block = max((sum(p.numel() for p in b.parameters()) for b in trunk_blocks(model)), default=0)
    blocks = getattr(model.trunk, "blocks", None)
    # A depth to extrapolate over only where the model's constructor takes one (timm's ViTs): EfficientNet's and
    # MobileNetV3's `blocks` are stages of unlike blocks, built from an arch string, and are measured whole.
    takes_depth = "depth" in inspect.signature(type(model.trunk)).parameters
    depth = len(blocks) if takes_depth and isinstance(blocks, (nn.Sequential, nn.ModuleList)) else 0
    return TrunkSize(params, largest, depth, largest_block)


def zero_state_bytes(
    params: int, largest_layer: int, stage: int, world_size: int, bf16: bool, zero3_kept: int | None = None
) -> int:
    """Trunk weights, gradients and AdamW states per rank under ZeRO `stage` (closed form).

    Each part of BF16_PARTS / FP32_PARTS that `stage` holds counts whole below its partitioning stage and
    divided by the world size from it on; stage 3 adds the largest layer, gathered, and the `zero3_kept`
    elements it keeps gathered from the forward to the backward (zero3_kept_elements; None: DeepSpeed's
    defaults), bf16 stage 2 a layer-sized temporary.
    """
    replicated, partitioned = zero_state_split(params, largest_layer, stage, world_size, bf16, zero3_kept)
    return replicated + partitioned


def zero_state_split(
    params: int, largest_layer: int, stage: int, world_size: int, bf16: bool, zero3_kept: int | None = None
) -> tuple[int, int]:
    """zero_state_bytes as (bytes every rank holds whatever the world size, bytes partitioned over the ranks)."""
    if stage not in ALL_STAGES or world_size < 1:
        raise ValueError(f"zero.stage={stage} must be 0-3 and the world size {world_size} >= 1")
    replicated = partitioned = 0.0
    for _, nbytes, held, from_stage in BF16_PARTS if bf16 else FP32_PARTS:
        if stage not in held:
            continue
        # a flat copy's bucket is sent once it holds more than the limit: up to one tensor (layer) past it
        count = min(params, FLAT_ALLREDUCE_ELEMENTS + largest_layer) if from_stage == FLAT_ALLREDUCE else params
        if stage >= from_stage:
            partitioned += count * nbytes / world_size
        else:
            replicated += count * nbytes
    if stage == 2 and bf16:
        replicated += ZERO2_BF16_LAYER_BYTES * largest_layer
    if stage == 3 and world_size == 1:
        replicated += 4 * largest_layer
    elif stage == 3:
        # the peak is the step's (with its 4/N flat copy) or the backward's (with the forward's gathered weights,
        # which more ranks do not shrink; then the step-only copy is not alive)
        kept = zero3_kept_elements(params, largest_layer, ZeroConfig()) if zero3_kept is None else zero3_kept
        gathered = (2 if bf16 else 4) * kept
        step_only = 4 * params / world_size
        replicated += ZERO3_LAYER_BYTES[bf16] * largest_layer
        if gathered > step_only:
            replicated, partitioned = replicated + gathered, partitioned - step_only
    return int(replicated), int(partitioned)


def replicated_state_parts(stage: int, bf16: bool) -> list[str]:
    """Names of the trunk-state parts every rank holds whole at `stage` (they do not shrink with more ranks)."""
    parts = BF16_PARTS if bf16 else FP32_PARTS
    whole = [name for name, _, held, from_stage in parts if stage in held and stage < from_stage]
    if stage == 2 and bf16:
        whole.append("a layer-sized temporary")
    if stage == 3:
        whole += ["the weights gathered from the forward to the backward", "the largest layer, gathered"]
    return whole


def trunk_state(cfg: RunConfig, size: TrunkSize) -> tuple[int, str]:
    """(bytes, where the number comes from) for the trunk's states on one rank."""
    world = cfg.slurm.nodes * cfg.slurm.tasks_per_node
    layer = size.gathered_unit(cfg.zero)
    states = zero_state_bytes(size.params, layer, cfg.zero.stage, world, cfg.zero.bf16, size.zero3_kept(cfg.zero))
    return states, "closed form fitted to DeepSpeed's engines"


def bucket_bytes(zero: ZeroConfig) -> int:
    """DeepSpeed's gradient-reduction bucket: zero.reduce_bucket_size elements allocated whole (not capped
    by the model's size) at stages 1-3, doubled by zero.overlap_comm at stages 1-2; bf16 at stage 1 runs
    DeepSpeed's BF16_Optimizer (a full fp32 gradient buffer, counted in the states) instead."""
    if zero.stage == 0 or (zero.stage == 1 and zero.bf16):
        return 0
    double = zero.overlap_comm and zero.stage < 3  # stage 3 keeps one bucket per dtype whatever overlap_comm says
    return zero.reduce_bucket_size * (2 if zero.bf16 else 4) * (2 if double else 1)


@dataclasses.dataclass(frozen=True)
class Saved:
    """Bytes saved for backward: floating (they halve in bf16) and other (masks, indices)."""

    floating: float = 0.0
    other: float = 0.0

    def __add__(self, o: "Saved") -> "Saved":
        return Saved(self.floating + o.floating, self.other + o.other)

    def scaled(self, k: float) -> "Saved":
        return Saved(self.floating * k, self.other * k)

    def at(self, bf16: bool) -> float:
        return self.floating * (0.5 if bf16 else 1.0) + self.other


class SavedCounter:
    """saved_tensors_hooks that record every saved tensor's storage once, parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, tuple[int, bool]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude:
            self.storages[s.data_ptr()] = (s.nbytes(), t.is_floating_point())
        return t

    @property
    def saved(self) -> Saved:
        return Saved(
            float(sum(n for n, f in self.storages.values() if f)),
            float(sum(n for n, f in self.storages.values() if not f)),
        )

    @contextlib.contextmanager
    def active(self) -> Iterator["SavedCounter"]:
        with saved_tensors_hooks(self.pack, lambda t: t):
            yield self


def measure_saved(model: nn.Module, images: torch.Tensor) -> Saved:
    """Peak bytes held for backward by one training forward of `model` on `images`.

    Without gradient checkpointing that is everything the forward saves. With it (timm's checkpoint
    regions), each region is run through reentrant checkpointing, whose saved inputs are what stays
    alive; during backward one region at a time is recomputed, so the peak adds the largest region's
    own saved bytes, measured by running the region once with gradients on.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    outer = SavedCounter(params)
    regions: list[Saved] = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def region(function: Callable[..., Any], *args: Any, use_reentrant: bool | None = None, **kwargs: Any) -> Any:
        out = real_checkpoint(function, *args, use_reentrant=True, **kwargs)
        inner = SavedCounter(params | set(outer.storages))  # the region's input is held by the outer save
        with torch.enable_grad(), inner.active():
            function(*[a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args], **kwargs)
        regions.append(inner.saved)
        return out

    model.train()
    with mock.patch.object(torch.utils.checkpoint, "checkpoint", region), outer.active():
        model(images)
    return outer.saved + max(regions, key=lambda s: s.floating + s.other, default=Saved())


def build_measured(cfg: ModelConfig, depth: int = 0) -> nn.Module:
    """build_backbone's network (random weights, no checkpoint file), at another depth when given."""
    if not depth:
        return build_backbone(dataclasses.replace(cfg, checkpoint_path=""))
    kwargs = {**timm_kwargs(cfg), "depth": depth, "drop_path_rate": cfg.drop_path_rate}
    trunk = timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.grad_checkpointing:
        getattr(trunk, "set_grad_checkpointing")(True)
    return EmbeddingModel(trunk, cfg.embed_dim, cfg.neck)


@dataclasses.dataclass(frozen=True)
class Activations:
    per_sample: Saved  # at fp32; Saved.at(bf16) for the run's dtype
    how: str


_ACTIVATIONS: dict[str, Activations] = {}


def activations(model_cfg: ModelConfig, image_size: int, size: TrunkSize) -> Activations:
    """Saved-for-backward bytes per image, measured on CPU at MEASURE_BATCH images (cached per model).

    ViT-like trunks (timm `blocks` and a `depth` argument) are measured at DEPTH_PROBES and extrapolated
    linearly to their depth: blocks are identical, and a full ViT-L forward costs ~10 s on 2 cores.
    """
    key = json.dumps([dataclasses.asdict(model_cfg), image_size], sort_keys=True)
    if key in _ACTIVATIONS:
        return _ACTIVATIONS[key]
    images = torch.randn(MEASURE_BATCH, model_cfg.in_chans, image_size, image_size)
    ckpt = ", grad checkpointing on" if model_cfg.grad_checkpointing else ""
    torch.manual_seed(0)
    lo, hi = DEPTH_PROBES
    if size.depth > hi:
        a, b = (measure_saved(build_measured(model_cfg, d), images) for d in DEPTH_PROBES)
        # With checkpointing the recomputed region is one block at every depth: only the saved inputs grow.
        total = a + (b + a.scaled(-1.0)).scaled(size.depth - lo)
        how = f"measured at depths {lo} and {hi} of {size.depth}, extrapolated{ckpt}"
    else:
        total = measure_saved(build_measured(model_cfg), images)
        how = f"measured on the full trunk{ckpt}"
    result = Activations(total.scaled(1.0 / MEASURE_BATCH), f"{how}; CPU forward of {MEASURE_BATCH} images")
    _ACTIVATIONS[key] = result
    return result
