"""Per-GPU memory plan of a run, before anything is queued: `python -m launch --recipe NAME --estimate`.

Four parts per rank, each from the resolved config:
- trunk states (weights, gradients, AdamW) under ZeRO: DeepSpeed's own estimator for the 16-bit
  stages 2 and 3 (`estimate_zero{2,3}_model_states_mem_needs`, no offload), the closed form of
  `zero_state_bytes` otherwise (fp32 ZeRO-1/2/3 also hold DeepSpeed's fp32 master partition and a second
  gradient copy); the parameter count comes from the trunk built on the meta device; plus DeepSpeed's
  gradient bucket;
- the class-sharded head: this rank's shard (plus CHEST's replicated FC) in fp32 with its optimizer's
  row state (AdamW's two moments or SGD's momentum) and gradient; the [G, C_local] logit blocks of the
  sharded softmax; and what else the head's autograd graph holds at the step's peak (normalised or
  mapped table copies, the distance / cosine blocks saved for backward), fitted to measured peaks
  (launch/head_memory.py);
- activations: the bytes autograd saves for backward, counted with saved_tensors_hooks on a CPU
  forward at MEASURE_BATCH images and scaled linearly to data.batch_size;
- a fixed runtime reserve (CUDA context, NCCL buffers, allocator slack; not measured).
A Slurm submission with GPUs whose total exceeds `--gpu-mem-gb` is refused with the fixes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Callable, Iterator
from unittest import mock

import timm
import torch
import torch.utils.checkpoint
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from launch.head_memory import (
    HEAD_OPTIMIZER_FIXES,
    LOGIT_COPIES,
    head_bytes_per_value,
    head_graph_bytes,
    head_shards,
    logit_bytes,
    logit_columns,
)
from model.backbone import EmbeddingModel, build_backbone, timm_kwargs
from model.config import ModelConfig
from model.proxies import class_range
from train.config import RunConfig, ZeroConfig

GIB = 2**30
MEASURE_BATCH = 2  # images of the CPU forward; activations scale linearly from here
SUGGESTED_CHUNK = 8192  # loss.class_chunk offered by the fixes: [G, 8192] blocks, GEMMs still large
RUNTIME_RESERVE = 2 * GIB  # CUDA context, NCCL buffers, allocator fragmentation: a margin, not a measurement
DEPTH_PROBES = (2, 3)  # ViT-like trunks: measured at these depths and extrapolated (block 0 has no drop path)

ALL_STAGES = (0, 1, 2, 3)
# Bytes per trunk parameter held per rank: (part, bytes, the stages that hold it, the first stage that partitions
# it over the ranks). Under mixed precision (zero.bf16=true) DeepSpeed's estimator counts the same for stage 2
# (2 + 18/N) and stage 3 (18/N); stage 3 keeps no separate 16-bit gradient (it is reduce-scattered into the
# fp32 partition).
BF16_PARTS = (
    ("bf16 weights", 2, ALL_STAGES, 3),
    ("bf16 gradients", 2, (0, 1, 2), 2),
    ("fp32 gradient partition", 4, ALL_STAGES, 2),
    ("fp32 master weights", 4, ALL_STAGES, 1),
    ("fp32 AdamW moments", 8, ALL_STAGES, 1),
)
# In fp32, ZeRO stages 1-3 still clone an fp32 master partition of the (already fp32) weights for the optimizer
# (deepspeed/runtime/zero/stage_1_and_2.py, single_partition_of_fp32_groups) and step it on a second, flat copy
# of the reduced gradient partition; stage 1 reduces the gradients only after the backward, so every rank holds
# them whole until then: 16 B per parameter at stage 0, 8 + 16/N at stage 1, 4 + 20/N at stage 2, 24/N at stage 3
# (the most of the tensors alive during the backward and at the optimizer step of real engines,
# tests/test_estimate.py).
FP32_PARTS = (
    ("fp32 weights", 4, ALL_STAGES, 3),
    ("fp32 gradients (whole through the backward below stage 2)", 4, ALL_STAGES, 2),
    ("fp32 AdamW moments", 8, ALL_STAGES, 1),
    ("fp32 master copy of the weights' partition", 4, (1, 2, 3), 1),
    ("fp32 gradient of the master partition", 4, (1, 2, 3), 1),
)


@dataclasses.dataclass(frozen=True)
class TrunkSize:
    params: int
    largest_layer: int  # parameters of the largest single module: what ZeRO-3 gathers at once
    depth: int  # len(trunk.blocks) for ViT-like trunks, 0 otherwise


def trunk_size(cfg: ModelConfig) -> TrunkSize:
    """Parameter counts of `build_backbone(cfg)` built on the meta device (no weights allocated)."""
    with torch.device("meta"):
        model = build_backbone(dataclasses.replace(cfg, checkpoint_path=""))  # nothing to load into meta tensors
    # parameters() yields a shared parameter once; DeepSpeed's model_to_params dedups by data_ptr, which is 0
    # for every meta tensor, so its *_all_live estimators cannot take a meta model.
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    blocks = getattr(model.trunk, "blocks", None)
    return TrunkSize(params, largest, len(blocks) if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else 0)


def zero_state_bytes(params: int, largest_layer: int, stage: int, world_size: int, bf16: bool) -> int:
    """Trunk weights, gradients and AdamW states per rank under ZeRO `stage` (closed form).

    Each part of BF16_PARTS / FP32_PARTS that `stage` holds counts whole below its partitioning stage and
    divided by the world size from it on; stage 3 also gathers one layer at a time (4 bytes per parameter of
    the largest layer), as DeepSpeed's estimator counts.
    """
    replicated, partitioned = zero_state_split(params, largest_layer, stage, world_size, bf16)
    return replicated + partitioned


def zero_state_split(params: int, largest_layer: int, stage: int, world_size: int, bf16: bool) -> tuple[int, int]:
    """zero_state_bytes as (bytes every rank holds whatever the world size, bytes partitioned over the ranks)."""
    if stage not in ALL_STAGES or world_size < 1:
        raise ValueError(f"zero.stage={stage} must be 0-3 and the world size {world_size} >= 1")
    replicated = partitioned = 0.0
    for _, nbytes, held, from_stage in BF16_PARTS if bf16 else FP32_PARTS:
        if stage not in held:
            continue
        if stage >= from_stage:
            partitioned += params * nbytes / world_size
        else:
            replicated += params * nbytes
    return int(replicated) + (4 * largest_layer if stage == 3 else 0), int(partitioned)


def replicated_state_parts(stage: int, bf16: bool) -> list[str]:
    """Names of the trunk-state parts every rank holds whole at `stage` (they do not shrink with more ranks)."""
    parts = BF16_PARTS if bf16 else FP32_PARTS
    whole = [name for name, _, held, from_stage in parts if stage in held and stage < from_stage]
    return whole + (["the largest layer, gathered"] if stage == 3 else [])


def deepspeed_state_bytes(params: int, largest_layer: int, stage: int, gpus_per_node: int, nodes: int) -> int:
    """DeepSpeed's own per-GPU estimate for 16-bit ZeRO-2/3 without offload."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2:
        return estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False)[1]
    if stage == 3:
        return estimate_zero3_model_states_mem_needs(
            params, largest_layer, gpus_per_node, nodes, cpu_offload=False, cpu_offload_params=False
        )[1]
    raise ValueError(f"DeepSpeed estimates ZeRO stages 2 and 3, not {stage}")


def trunk_state(cfg: RunConfig, size: TrunkSize) -> tuple[int, str]:
    """(bytes, where the number comes from) for the trunk's states on one rank."""
    world = cfg.slurm.nodes * cfg.slurm.tasks_per_node
    if cfg.zero.bf16 and cfg.zero.stage in (2, 3):
        return (
            deepspeed_state_bytes(
                size.params, size.largest_layer, cfg.zero.stage, cfg.slurm.tasks_per_node, cfg.slurm.nodes
            ),
            "DeepSpeed estimator",
        )
    return zero_state_bytes(size.params, size.largest_layer, cfg.zero.stage, world, cfg.zero.bf16), "closed form"


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


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per component (rows) for each group of ranks with the same shard (columns)."""

    groups: list[str]
    rows: dict[str, tuple[str, list[int]]]  # key -> (label, bytes per group)
    budget: int
    notes: list[str]
    trunk: TrunkSize | None = None  # the parameter counts the states row was computed from

    @property
    def totals(self) -> list[int]:
        return [sum(values[i] for _, values in self.rows.values()) for i in range(len(self.groups))]

    def most(self, key: str) -> int:
        """The largest value of row `key` over the groups (0 for a row the plan lacks)."""
        return max(self.rows[key][1]) if key in self.rows else 0

    @property
    def peak(self) -> int:
        return max(self.totals)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget


def estimate(cfg: RunConfig, gpu_mem_gb: float) -> Estimate:
    """The memory plan of `cfg` (resolved) per rank against a budget of `gpu_mem_gb` GiB."""
    if not gpu_mem_gb > 0:
        raise ValueError(f"--gpu-mem-gb={gpu_mem_gb:g} must be > 0 (the memory of one GPU in GiB, e.g. 80)")
    if cfg.data.num_classes < 1:
        raise ValueError(
            "data.num_classes is not known yet (the manifest is written when the job starts); "
            "set data.num_classes=N for the estimate"
        )
    world = cfg.slurm.nodes * cfg.slurm.tasks_per_node
    size = trunk_size(cfg.model)
    states, source = trunk_state(cfg, size)
    shards = head_shards(cfg.loss, cfg.data.num_classes, cfg.model.embed_dim, world, cfg.optim.head_optimizer)
    acts = activations(cfg.model, cfg.data.image_size, size)
    global_batch = cfg.data.batch_size * world
    dtype = "bf16" if cfg.zero.bf16 else "fp32"
    per_image = acts.per_sample.at(cfg.zero.bf16)
    cols = logit_columns(cfg.loss)
    chunk = f", {cfg.loss.class_chunk} classes at a time" if cfg.loss.class_chunk > 0 else ""
    n = len(shards)
    rows = {
        "states": (f"trunk states, ZeRO-{cfg.zero.stage} {dtype} ({source})", [states] * n),
        "bucket": ("DeepSpeed gradient bucket (reduce_bucket_size)", [bucket_bytes(cfg.zero)] * n),
        "head": (
            f"head shard x {shards[0].bytes_per_value:g} B (fp32 weight, {cfg.optim.head_optimizer} state, grad)",
            [s.state_bytes for s in shards],
        ),
        "logits": (
            f"head logits [G={global_batch}, C_local x {cols:g}] fp32 x {LOGIT_COPIES}{chunk}",
            [logit_bytes(global_batch, s.num_local, cfg.loss, cfg.model.embed_dim) for s in shards],
        ),
        "graph": (
            "head graph beyond the logits (table copies, saved blocks; fitted)",
            [
                head_graph_bytes(global_batch, s.num_local, cfg.loss, cfg.model.embed_dim, cfg.optim.head_optimizer)
                for s in shards
            ],
        ),
        "activations": (
            f"activations {cfg.data.batch_size} x {per_image / 2**20:.1f} MiB ({dtype})",
            [int(per_image * cfg.data.batch_size)] * n,
        ),
        "reserve": ("runtime reserve (CUDA context, NCCL, allocator)", [RUNTIME_RESERVE] * n),
    }
    groups = [f"ranks {a}-{b}" if a != b else f"rank {a}" for a, b in (s.ranks for s in shards)]
    classes = ", ".join(f"{s.num_local} on {g}" for s, g in zip(shards, groups))
    notes = [
        f"trunk {cfg.model.name}: {size.params / 1e6:.1f} M parameters (largest layer "
        f"{size.largest_layer / 1e6:.2f} M); head {cfg.loss.name}: {cfg.data.num_classes} classes ({classes})",
        f"activations: {acts.how}",
    ]
    if cfg.slurm.gpus_per_node < 1:
        notes.append("slurm.gpus_per_node=0: the ranks are CPU processes; the table is per process")
    return Estimate(groups, rows, int(gpu_mem_gb * GIB), notes, size)


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= 0.1 * GIB else f"{nbytes / 2**20:.1f} MiB"


def format_estimate(cfg: RunConfig, est: Estimate) -> str:
    world = cfg.slurm.nodes * cfg.slurm.tasks_per_node
    gib = [[_size(v) for v in values] for _, values in est.rows.values()]
    width = max(len(label) for label, _ in est.rows.values())
    cols = [max(len(g), *(len(r[i]) for r in gib)) for i, g in enumerate(est.groups)]
    lines = [
        f"memory per GPU of run {cfg.name} ({cfg.recipe or 'no recipe'}): {cfg.slurm.nodes} node(s) x "
        f"{cfg.slurm.tasks_per_node} tasks = {world} ranks, micro-batch {cfg.data.batch_size} per rank",
        *est.notes,
        "",
        " " * width + "  " + "  ".join(g.rjust(c) for g, c in zip(est.groups, cols)),
    ]
    for (label, _), values in zip(est.rows.values(), gib):
        lines.append(label.ljust(width) + "  " + "  ".join(v.rjust(c) for v, c in zip(values, cols)))
    lines.append("total".ljust(width) + "  " + "  ".join(_size(t).rjust(c) for t, c in zip(est.totals, cols)))
    verdict = "fits" if est.fits else "DOES NOT FIT"
    lines.append(
        f"budget {est.budget / GIB:g} GiB per GPU (--gpu-mem-gb): {verdict}, peak {est.peak / GIB:.2f} GiB "
        f"({(est.budget - est.peak) / GIB:+.2f} GiB headroom)"
    )
    return "\n".join(lines)


def fixes(cfg: RunConfig, est: Estimate) -> str:
    """What lowers the peak, the fixes of the largest parts first."""
    out: list[tuple[int, str]] = []
    world = cfg.slurm.nodes * cfg.slurm.tasks_per_node
    size = est.trunk or trunk_size(cfg.model)
    states, bucket = est.most("states"), est.most("bucket")
    if cfg.zero.stage < 3:
        nxt = dataclasses.replace(cfg, zero=dataclasses.replace(cfg.zero, stage=cfg.zero.stage + 1))
        after = trunk_state(nxt, size)[0] + bucket_bytes(nxt.zero)
        if after < states + bucket:  # fp32 ZeRO-1 on few ranks holds more than ZeRO-0 (master copy)
            out.append(
                (
                    states + bucket - after,
                    f"zero.stage={nxt.zero.stage} (the trunk's states and gradient bucket "
                    f"{_size(states + bucket)} -> {_size(after)})",
                )
            )
    whole, _ = zero_state_split(size.params, size.largest_layer, cfg.zero.stage, world, cfg.zero.bf16)
    whole = min(whole, states)
    shrinking = est.most("head") + states - whole
    held = replicated_state_parts(cfg.zero.stage, cfg.zero.bf16)
    kept = f"the {_size(whole)} of {', '.join(held)} held whole on every rank, " if held else ""
    out.append(
        (
            shrinking,
            f"more GPUs, slurm.nodes / slurm.tasks_per_node (the {_size(shrinking)} of head shard and partitioned "
            f"trunk states shrink as 1/ranks; {kept}the gradient bucket and activations do not)",
        )
    )
    if bucket >= est.peak // 20:  # where it is 5% of the peak or more
        smaller = dataclasses.replace(cfg.zero, reduce_bucket_size=max(1, cfg.zero.reduce_bucket_size // 4))
        single = dataclasses.replace(cfg.zero, overlap_comm=False)
        twice = " twice (zero.overlap_comm)" if bucket_bytes(single) < bucket else ""
        out.append(
            (
                bucket - bucket_bytes(smaller),
                f"a lower zero.reduce_bucket_size, e.g. {smaller.reduce_bucket_size} (DeepSpeed allocates its "
                f"{_size(bucket)} gradient bucket whole, {cfg.zero.reduce_bucket_size} elements{twice}, whatever "
                "the trunk's size; smaller buckets mean more, smaller gradient reductions: less communication "
                "efficiency)",
            )
        )
    if not cfg.model.grad_checkpointing:
        out.append((est.most("activations"), "model.grad_checkpointing=true (activations are recomputed in backward)"))
    out.append(
        (
            est.most("activations"),
            f"a lower data.batch_size (the {_size(est.most('activations'))} of activations scale with it)",
        )
    )
    if not cfg.zero.bf16:
        stage = " with zero.stage>=1 (DeepSpeed has no bf16 ZeRO-0)" if cfg.zero.stage == 0 else ""
        out.append(
            (
                est.most("activations"),
                f"zero.bf16=true{stage} (halves activations; the trunk's whole weights become bf16)",
            )
        )
    head_step = est.most("logits") + est.most("graph")
    if cfg.loss.sample_rate >= 1.0:
        out.append(
            (
                head_step,
                f"loss.sample_rate<1 (Partial-FC: a fraction of each shard's classes in "
                f"the {_size(head_step)} of logits and head temporaries)",
            )
        )
    largest_shard = class_range(cfg.data.num_classes, 0, world)[1]  # rank 0's is never smaller
    chunked = dataclasses.replace(cfg.loss, class_chunk=SUGGESTED_CHUNK)
    global_batch = cfg.data.batch_size * world
    saving = head_step - (
        logit_bytes(global_batch, largest_shard, chunked, cfg.model.embed_dim)
        + head_graph_bytes(global_batch, largest_shard, chunked, cfg.model.embed_dim, cfg.optim.head_optimizer)
    )
    if cfg.loss.class_chunk <= 0 and saving > 0:  # only where the shard (times the sample rate) exceeds a chunk
        out.append(
            (
                saving,
                f"loss.class_chunk={SUGGESTED_CHUNK} (the {_size(head_step)} of logits and head temporaries taken "
                f"{SUGGESTED_CHUNK} classes at a time and recomputed in backward)",
            )
        )
    now = head_bytes_per_value(cfg.optim.head_optimizer, cfg.loss.sample_rate)
    for other, why in HEAD_OPTIMIZER_FIXES.get(cfg.optim.head_optimizer, ()):
        if other.startswith("lazy_") and (cfg.loss.sample_rate >= 1.0 or cfg.loss.name in ("chest", "softtriple")):
            continue  # lazy updates pay only with sampling, and only DistArc-family tables take them
        ratio = head_bytes_per_value(other, cfg.loss.sample_rate) / now
        # a lazy optimizer's step has no dense table gradient to write after the head's graph: that graph's
        # peak no longer leaves room for it (head_graph_bytes)
        graph = head_graph_bytes(global_batch, largest_shard, cfg.loss, cfg.model.embed_dim, other)
        head_saving = int(est.most("head") * (1 - ratio)) + est.most("graph") - graph
        if head_saving >= est.peak // 20:  # where it saves 5% or more
            text = f"optim.head_optimizer={other} ({why}: the {_size(est.most('head'))} head shard x {ratio:.2f}"
            out.append((head_saving, text + ("; set optim.head_lr for SGD)" if "sgd" in other else ")")))
    return "; ".join(text for _, text in sorted(out, key=lambda item: -item[0]))


def print_estimates(cfgs: list[RunConfig], gpu_mem_gb: float) -> int:
    """`--estimate`: print every config's table; 0 when all fit the budget, 1 otherwise."""
    ok = True
    for cfg in cfgs:
        est = estimate(cfg, gpu_mem_gb)
        print(format_estimate(cfg, est), flush=True)
        if not est.fits:
            print(f"to fit: {fixes(cfg, est)}", flush=True)
        ok = ok and est.fits
    return 0 if ok else 1


def check_fits(cfgs: list[RunConfig], gpu_mem_gb: float, use_slurm: bool) -> None:
    """Refuse a GPU submission (--slurm with slurm.gpus_per_node > 0) whose estimate exceeds the budget."""
    for cfg in cfgs:
        if not use_slurm or cfg.slurm.gpus_per_node < 1:
            continue
        est = estimate(cfg, gpu_mem_gb)
        if not est.fits:
            raise ValueError(
                f"run {cfg.name} needs an estimated {est.peak / GIB:.2f} GiB per GPU, more than "
                f"--gpu-mem-gb={gpu_mem_gb:g}:\n{format_estimate(cfg, est)}\nto fit: {fixes(cfg, est)} "
                "(or raise --gpu-mem-gb if the GPUs have more memory)"
            )
