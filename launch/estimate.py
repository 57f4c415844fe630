"""Per-GPU memory plan of a run, before anything is queued: `python -m launch --recipe NAME --estimate`.

Four parts per rank, each from the resolved config:
- trunk states (weights, gradients, AdamW) under ZeRO: the closed form of `zero_state_bytes`, the tensors
  real DeepSpeed engines hold (fp32 ZeRO-1/2/3 also hold an fp32 master partition and a second gradient copy,
  ZeRO-0 and bf16 ZeRO-1 a flat all-reduce copy, ZeRO-3 the weights gathered from the forward to the
  backward; DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs` count less at bf16 ZeRO-3); the
  parameter count comes from the trunk built on the meta device; plus DeepSpeed's gradient bucket;
- the class-sharded head: this rank's shard (plus CHEST's replicated FC) in fp32 with its optimizer's
  row state (AdamW's two moments or SGD's momentum) and gradient; the [G, C_local] logit blocks of the
  sharded softmax; and what else the head's autograd graph holds at the step's peak (normalised or
  mapped table copies, the distance / cosine blocks saved for backward), fitted to measured peaks
  (launch/head_memory.py);
- activations: the bytes autograd saves for backward, counted with saved_tensors_hooks on a CPU
  forward at MEASURE_BATCH images and scaled linearly to data.batch_size;
- a fixed runtime reserve (CUDA context, NCCL buffers, allocator slack; not measured).
A Slurm submission with GPUs whose total exceeds `--gpu-mem-gib` is refused with the fixes.
The trunk's parts are computed in launch/trunk_memory.py, the head's in launch/head_memory.py; this module
adds them up per group of ranks, prints the table and names the fixes.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess


from launch.preflight import asks_for_gpus
from launch.head_memory import (
    HEAD_OPTIMIZER_FIXES,
    HeadShard,
    LOGIT_COPIES,
    head_bytes_per_value,
    head_graph_bytes,
    head_shards,
    logit_bytes,
    logit_columns,
    step_temporary_bytes,
)
from launch.trunk_memory import (
    TrunkSize,
    activations,
    bucket_bytes,
    replicated_state_parts,
    trunk_size,
    trunk_state,
    zero_state_split,
)
from model.config import LossConfig
from model.proxies import class_range
from train.config import RunConfig

GIB = 2**30
SUGGESTED_CHUNK = 8192  # loss.class_chunk offered by the fixes: [G, 8192] blocks, GEMMs still large
SUGGESTED_RATE = 0.1  # loss.sample_rate offered by the fixes: Partial FC's own setting (10% of the classes)
RUNTIME_RESERVE = 2 * GIB  # CUDA context, NCCL buffers, allocator fragmentation: a margin, not a measurement


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per component (rows) for each group of ranks with the same shard (columns)."""

    groups: list[str]
    rows: dict[str, tuple[str, list[int]]]  # key -> (label, bytes per group)
    budget: int
    notes: list[str]
    trunk: TrunkSize | None = None  # the parameter counts the states row was computed from
    # optim.fused=false: the optimizer steps' temporaries per group (the "step" row is what they exceed the
    # memory the backward freed by); empty with the fused kernel
    step_temporaries: tuple[int, ...] = ()

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


# One GPU's memory when --gpu-mem-gib is not given: an 80 GB H100 reports 81,559 MiB (nvidia-smi).
DEFAULT_GPU_MEM_GIB = 79.6


def estimate(cfg: RunConfig, gpu_mem_gib: float) -> Estimate:
    """The memory plan of `cfg` (resolved) per rank against a budget of `gpu_mem_gib` GiB."""
    if not gpu_mem_gib > 0:
        raise ValueError(f"--gpu-mem-gib={gpu_mem_gib:g} must be > 0 (the memory of one GPU in GiB, e.g. 79.6)")
    if cfg.data.num_classes < 1:
        raise ValueError(
            "data.num_classes is not known yet (the data set has no manifest yet: not converted); "
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
    temporaries: tuple[int, ...] = ()
    if not cfg.optim.fused:
        temporaries = _step_temporaries(cfg, size, shards)
        freed = [sum(rows[key][1][i] for key in FREED_BEFORE_THE_STEP) for i in range(n)]
        rows["step"] = (
            "optimizer step temporaries beyond what the backward freed (optim.fused=false: unfused AdamW)",
            [max(0, t - f) for t, f in zip(temporaries, freed)],
        )
    groups = [f"ranks {a}-{b}" if a != b else f"rank {a}" for a, b in (s.ranks for s in shards)]
    classes = ", ".join(f"{s.num_local} on {g}" for s, g in zip(shards, groups))
    notes = [
        f"trunk {cfg.model.name}: {size.params / 1e6:.1f} M parameters (largest layer "
        f"{size.largest_layer / 1e6:.2f} M); head {cfg.loss.name}: {cfg.data.num_classes} classes ({classes})",
        f"activations: {acts.how}",
    ]
    if cfg.slurm.gpus_per_node < 1:
        notes.append("slurm.gpus_per_node=0: the ranks are CPU processes; the table is per process")
    return Estimate(groups, rows, int(gpu_mem_gib * GIB), notes, size, temporaries)


# the rows the backward has freed by the time the optimizers step
FREED_BEFORE_THE_STEP = ("activations", "logits", "graph")


def _step_temporaries(cfg: RunConfig, size: TrunkSize, shards: list[HeadShard]) -> tuple[int, ...]:
    """optim.fused=false: per group, the larger of the trunk's and the head's unfused AdamW step temporaries
    (head_memory.step_temporary_bytes: foreach on GPUs, per tensor on CPU). The trunk steps its fp32 masters: from
    ZeRO-1 on this rank's flat partition (counted as one tensor), at ZeRO-0 layer by layer on CPU."""
    world = cfg.slurm.nodes * cfg.slurm.tasks_per_node
    on_gpu = cfg.slurm.gpus_per_node > 0
    stepped = size.params / (world if cfg.zero.stage >= 1 else 1)
    largest = (stepped, 0.0) if cfg.zero.stage >= 1 else (size.largest_layer, size.largest_layer)
    trunk = step_temporary_bytes(stepped, largest, "adamw", False, on_gpu)
    head = cfg.optim.head_optimizer
    return tuple(
        max(trunk, step_temporary_bytes(s.sharded_values + s.replicated_values, s.largest_tensors, head, False, on_gpu))
        for s in shards
    )


def _freed_saving(est: Estimate, delta: int) -> int:
    """What a fix that frees `delta` bytes of the backward's memory (activations, logit blocks, head graph) saves
    at the peak: with optim.fused=false the optimizers' temporaries come after the backward, so no more than the
    freed memory exceeds them by (the peak group's)."""
    if not est.step_temporaries:
        return delta
    peak = est.totals.index(est.peak)
    freed = sum(est.rows[key][1][peak] for key in FREED_BEFORE_THE_STEP)
    return min(delta, max(0, freed - est.step_temporaries[peak]))


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
        f"budget {est.budget / GIB:g} GiB per GPU (--gpu-mem-gib): {verdict}, peak {est.peak / GIB:.2f} GiB "
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
    whole, _ = zero_state_split(
        size.params, size.gathered_unit(cfg.zero), cfg.zero.stage, world, cfg.zero.bf16, size.zero3_kept(cfg.zero)
    )
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
    out += _zero3_kept_fix(cfg, size, states, est.peak)
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
    activations = _freed_saving(est, est.most("activations"))
    if not cfg.model.grad_checkpointing:
        out.append((activations, "model.grad_checkpointing=true (activations are recomputed in backward)"))
    out.append(
        (
            activations,
            f"a lower data.batch_size (the {_size(est.most('activations'))} of activations scale with it)",
        )
    )
    if not cfg.zero.bf16:
        stage = " with zero.stage>=1 (DeepSpeed has no bf16 ZeRO-0)" if cfg.zero.stage == 0 else ""
        out.append(
            (
                activations,
                f"zero.bf16=true{stage} (halves activations; the trunk's whole weights become bf16)",
            )
        )
    if est.most("step") >= est.peak // 20:  # where it saves 5% or more
        out.append((est.most("step"), "optim.fused=true (AdamW's fused kernel holds no temporaries in its step)"))
    head_step = est.most("logits") + est.most("graph")
    largest_shard = class_range(cfg.data.num_classes, 0, world)[1]  # rank 0's is never smaller
    global_batch = cfg.data.batch_size * world

    def head_step_with(loss: LossConfig) -> int:
        return logit_bytes(global_batch, largest_shard, loss, cfg.model.embed_dim) + head_graph_bytes(
            global_batch, largest_shard, loss, cfg.model.embed_dim, cfg.optim.head_optimizer
        )

    if cfg.loss.sample_rate >= 1.0:
        saving = _freed_saving(
            est, head_step - head_step_with(dataclasses.replace(cfg.loss, sample_rate=SUGGESTED_RATE))
        )
        if saving >= est.peak // 20:  # where it saves 5% or more: it changes the loss
            out.append(
                (
                    saving,
                    f"loss.sample_rate={SUGGESTED_RATE:g} (Partial FC: the batch's classes and a random tenth of "
                    f"the others in the {_size(head_step)} of logits and head temporaries; the softmax is then over "
                    "sampled negatives)",
                )
            )
    saving = _freed_saving(est, head_step - head_step_with(dataclasses.replace(cfg.loss, class_chunk=SUGGESTED_CHUNK)))
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
        # none of them holds unfused AdamW's step temporaries: the step row goes too (all of it where the head's
        # exceed the trunk's, as with any large table; an over-statement otherwise)
        head_saving = int(est.most("head") * (1 - ratio)) + _freed_saving(est, est.most("graph") - graph)
        head_saving += est.most("step")
        if head_saving >= est.peak // 20:  # where it saves 5% or more
            text = f"optim.head_optimizer={other} ({why}: the {_size(est.most('head'))} head shard x {ratio:.2f}"
            out.append((head_saving, text + ("; set optim.head_lr for SGD)" if "sgd" in other else ")")))
    return "; ".join(text for _, text in sorted(out, key=lambda item: -item[0]))


def _zero3_kept_fix(cfg: RunConfig, size: TrunkSize, states: int, peak: int) -> list[tuple[int, str]]:
    """ZeRO-3 keeps weights gathered from the forward to the backward (zero3_kept_elements): offer a quarter of
    them where that saves 5% of the peak or more."""
    unit, kept = size.gathered_unit(cfg.zero), size.zero3_kept(cfg.zero)
    if cfg.zero.stage != 3 or kept <= 4 * unit:
        return []
    quarter = kept // 4
    less = max(1, quarter - quarter % 10 ** max(0, len(str(quarter)) - 2))  # two significant digits
    lowered = dataclasses.replace(cfg.zero, stage3_max_reuse_distance=less, stage3_max_live_parameters=less)
    saving = states - trunk_state(dataclasses.replace(cfg, zero=lowered), size)[0]
    if saving < peak // 20:
        return []
    return [
        (
            saving,
            f"zero.stage3_max_reuse_distance={less} and zero.stage3_max_live_parameters={less} (ZeRO-3 keeps "
            f"{kept / 1e6:.0f} M gathered parameters from the forward to the backward on every rank; the backward "
            "all-gathers the others again: more communication)",
        )
    ]


def print_estimates(cfgs: list[RunConfig], gpu_mem_gib: float) -> int:
    """`--estimate`: print every config's table; 0 when all fit the budget, 1 otherwise."""
    ok = True
    for cfg in cfgs:
        est = estimate(cfg, gpu_mem_gib)
        print(format_estimate(cfg, est), flush=True)
        if not est.fits:
            print(f"to fit: {fixes(cfg, est)}", flush=True)
        ok = ok and est.fits
    return 0 if ok else 1


def local_gpu_mem_gib() -> float | None:
    """The smallest GPU's memory on this machine in GiB, from `nvidia-smi` (the launcher makes no CUDA context
    of its own, which would hold memory on GPU 0 while it follows the job); None without nvidia-smi or GPUs."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        sizes = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(sizes) / 1024 if sizes else None  # MiB


def check_fits(cfgs: list[RunConfig], gpu_mem_gib: float | None, use_slurm: bool) -> None:
    """Refuse a GPU run whose estimate exceeds one GPU's memory: a --slurm submission asking for GPUs
    (launch.preflight.asks_for_gpus) against `gpu_mem_gib` (None: DEFAULT_GPU_MEM_GIB), a local run with
    slurm.gpus_per_node > 0 against `gpu_mem_gib` or else this machine's smallest GPU (local_gpu_mem_gib;
    unchecked where nvidia-smi does not answer)."""
    for cfg in cfgs:
        if use_slurm and not asks_for_gpus(cfg) or not use_slurm and cfg.slurm.gpus_per_node < 1:
            continue
        budget, source = gpu_mem_gib, "--gpu-mem-gib"
        if budget is None:
            budget, source = (
                (DEFAULT_GPU_MEM_GIB, "--gpu-mem-gib") if use_slurm else (local_gpu_mem_gib(), "nvidia-smi")
            )
        if budget is None:
            continue
        est = estimate(cfg, budget)
        if not est.fits:
            raise ValueError(
                f"run {cfg.name} needs an estimated {est.peak / GIB:.2f} GiB per GPU, more than the "
                f"{budget:g} GiB of one GPU ({source}):\n{format_estimate(cfg, est)}\nto fit: {fixes(cfg, est)} "
                "(or give --gpu-mem-gib if the GPUs have more memory)"
            )
