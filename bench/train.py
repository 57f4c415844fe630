"""Throughput of the real training step against a bare PyTorch loop, with a breakdown, memory and MFU.

Every row runs in fresh processes (`--world` ranks: gloo on CPU, NCCL on GPUs) on the same data:
  * bare: the same timm network (model.backbone.build_backbone of the recipe), the same per-rank batch and
    batches, torch AdamW and an nn.Linear softmax cross-entropy over all classes, trunk and classifier in
    one module under one DDP when P > 1 (so the classifier's C x D gradient is all-reduced too); no
    DeepSpeed. The baseline every other row is compared with.
  * ours: train.main.build_model -> train.step.train_step, exactly what `python -m launch.rank` runs
    (DeepSpeed ZeRO, the class-sharded head and its optimizer, the non-finite guard);
  * one row per `--variant NAME:key=value,...`: ours with the overrides (the speed switches on/off).
Numerics are each side's own and are not matched: with zero.bf16 the bare loop runs under bf16 autocast
(fp32 weights; the trunk's and the classifier's GEMMs in bf16, the loss in fp32), ours runs the trunk in
pure bf16 (DeepSpeed's bf16 weights and activations, fp32 master copy in the optimizer) and the head in
fp32; without it both are fp32. Neither enables TF32 (torch's default: fp32 matmuls without it).
Each step is one micro-batch (optim.grad_accum_steps must be 1).
Columns: global img/s, img/s per rank, ms per step (the median of the timed steps; the slowest rank's),
"vs bare": the time per image against the bare row's at the same P (bare img/s / row img/s: the step time
ratio at equal batches, still right where a variant changes the batch; > 1 is slower); a breakdown of one
rank's step (data: the loader's wait, the copy to the device and the normalisation; the trunk's forward, the
head's forward + loss + backward, the trunk's backward, optimizers) measured in a second pass with the device
synchronised between phases (the head's backward ends when the embedding's gradient arrives: a tensor hook
there, only in that pass), and the time inside
collectives (comm: torch.distributed's and DeepSpeed's; a part of the phases, not beside them; "n/a" for the
bare loop, whose DDP all-reduces from C++ where it is not seen); the head's share of the step; peak memory
(max over ranks: on CUDA max_memory_allocated / max_memory_reserved, else the process's peak resident set,
torch and the data included), with our rows' `--estimate` beside it (launch/estimate.py's peak per rank
less its runtime reserve: on CUDA the planner's check); and on CUDA the MFU: 3 x forward FLOPs per image
(torch.utils.flop_counter) x img/s per GPU / the GPU's dense peak (bf16 tensor cores, or plain fp32 without
TF32; cuDNN may still pick TF32 for convolutions by torch's default, so a conv net's fp32 MFU can read high).
On a machine with fewer cores than ranks x threads the ranks share cores: compare rows at equal P.
The instruments (timers, op counts, profiles, memory, FLOPs) live in bench/instruments.py.
`--count-ops`: a second table of the aten ops each phase dispatches in one step (on a GPU each is at least
one kernel launch, so it shows a launch-bound phase on a machine without one). `--profile`: one more step
per row under torch.profiler, its top ops by self time and, on CUDA, how busy the GPU was (kernel time /
wall time; far below 100% means the host sets the pace); `--trace-dir DIR` also writes Chrome traces.

    python -m bench.train [--recipe mnist_distarc] [--world 1,2] [--steps 30] [--warmup 5]
                          [--data synthetic|stream|shards [--images N] [--classes C] [--source WxH]]
                          [--variant NAME:key=v,...] [--no-variants] [--count-ops] [--profile [--trace-dir DIR]]
                          [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from bench.data import write_jpeg_shards
from bench.instruments import (
    OpCounter,
    Timer,
    forward_flops_per_image,
    mfu,
    peak_memory_mb,
    peak_reserved_mb,
    planned_mb,
    profile_step,
    timed_collectives,
)
from bench.ranks import empty_compile_cache, last_line, run_ranks
from launch.__main__ import build_config
from launch.recipes import get_recipe
from train.config import RunConfig
from train.overrides import apply_overrides

DEFAULT_VARIANTS = (
    "fused AdamW off:optim.fused=false",
    "overlap_comm off:zero.overlap_comm=false",
    "fused grad checks off:zero.fused_grad_checks=false",
    "ZeRO-1:zero.stage=1",
    "ZeRO-3:zero.stage=3",
    "ZeRO-3, DeepSpeed's fetch sync:zero.stage=3,zero.stage3_skip_local_fetch_sync=false",
    "ZeRO-3, no leaf blocks:zero.stage=3,zero.stage3_leaf_blocks=false",
    "compile:model.compile=true",
)
PHASES = ("data", "forward", "head", "backward", "optimizer")


def synthetic_batches(
    cfg: RunConfig, rank: int, device: torch.device, count: int = 4
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`count` fixed uint8 batches of this rank, cycled (as the loader yields them with uint8 batches)."""
    g = torch.Generator().manual_seed(1000 + rank)
    d = cfg.data
    batches = [
        (
            torch.randint(
                0, 256, (d.batch_size, d.in_chans, d.image_size, d.image_size), dtype=torch.uint8, generator=g
            ),
            torch.randint(0, d.num_classes, (d.batch_size,), generator=g),
        )
        for _ in range(count)
    ]
    if device.type == "cuda":
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    i = 0
    while True:
        yield batches[i % count]
        i += 1


def _unseen(emb: torch.Tensor) -> None:
    pass


@contextlib.contextmanager
def _untimed_split(first: str, second: str) -> Iterator[Callable[[], None]]:
    yield lambda: None


class BareNet(nn.Module):
    """The bare loop's network: the trunk and the linear classifier in one module, so that one DDP holds
    both and all-reduces the classifier's gradient with the trunk's, as any DDP user's loop would."""

    def __init__(self, trunk: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.trunk, self.fc = trunk, fc
        self.seen: Callable[[torch.Tensor], None] = _unseen  # the breakdown's look at the embedding

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.trunk(x)
        self.seen(emb)  # the breakdown: the trunk's forward ends here
        return nn.functional.cross_entropy(self.fc(emb.float()), labels)


class BareLoop:
    """The baseline: build_backbone + nn.Linear softmax CE + torch AdamW (+ DDP), nothing of ours."""

    def __init__(self, cfg: RunConfig, device: torch.device, world: int) -> None:
        from model.backbone import build_backbone

        torch.manual_seed(cfg.seed)
        trunk = build_backbone(cfg.model)
        self.net = BareNet(trunk, nn.Linear(cfg.model.embed_dim, cfg.data.num_classes)).to(device)
        self.model: nn.Module = self.net
        if world > 1:
            self.model = nn.parallel.DistributedDataParallel(self.net)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.optim.lr, fused=cfg.optim.fused or None)
        self.device, self.dtype = device, torch.bfloat16 if cfg.zero.bf16 else torch.float32
        from data.transforms import InputNormaliser

        self.normaliser = InputNormaliser(cfg.data)

    def step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], timer: Timer | None) -> None:
        phase = timer.phase if timer else (lambda name: contextlib.nullcontext())
        split = timer.split if timer else _untimed_split
        with phase("data"):
            images, labels = next(batches)
            x = self.normaliser(images, self.device, torch.float32)
            labels = labels.to(self.device, non_blocking=True)
        held: list[torch.Tensor] = []  # the breakdown: the embedding, for the backward's split
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            with split("forward", "head") as mark:  # DDP's forward, the trunk's; then the classifier and loss

                def seen(emb: torch.Tensor) -> None:
                    mark()
                    held.append(emb)

                if timer is not None:
                    self.net.seen = seen
                try:
                    loss = self.model(x, labels)
                finally:
                    self.net.seen = _unseen
        with split("head", "backward") as mark:  # the head's backward until the embedding's gradient, the trunk's
            hooks = [emb.register_hook(lambda grad: mark()) for emb in held]
            loss.backward()
            for hook in hooks:
                hook.remove()
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class OurStep:
    """train_step on the model train/main.py builds; with a timer, the same calls phase by phase."""

    def __init__(self, cfg: RunConfig, env: Any, device: torch.device) -> None:
        from train.main import build_model

        self.cfg = cfg
        self.tr, _ = build_model(cfg, env, device, None)
        self.step_index = 0

    def step(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], timer: Timer | None) -> None:
        from train.step import reduce_head_grads, train_step

        if timer is None:  # what train_step reads of a run
            train_step(
                types.SimpleNamespace(
                    model=self.tr,
                    batches=batches,
                    cfg=self.cfg,  # type: ignore[arg-type]
                    state=types.SimpleNamespace(step=self.step_index),
                )
            )
        else:
            tr = self.tr
            with timer.phase("data"):
                images, labels = next(batches)
                x = tr.model_input(images)
                labels = labels.to(tr.device, non_blocking=True)
            with timer.phase("forward"):
                emb = tr.engine(x)
            with timer.phase("head"):
                out = tr.task.head(emb.float(), labels, step=self.step_index)
            with timer.split("head", "backward") as mark:  # the head's backward until the embedding's gradient
                hook = emb.register_hook(lambda grad: mark())  # arrives, then the trunk's (and ZeRO's reductions)
                tr.engine.backward(out["loss"])
                hook.remove()
            with timer.phase("optimizer"):
                reduce_head_grads(tr.task.head)
                tr.engine.step()
                tr.head_optimizer.step()
                tr.head_optimizer.zero_grad(set_to_none=True)
                tr.head_scheduler.step()
        self.step_index += 1


@dataclasses.dataclass(frozen=True)
class Options:
    """How each row is measured (the command line's switches)."""

    steps: int = 30
    warmup: int = 5
    data: str = "synthetic"
    count_ops: bool = False
    profile: bool = False
    trace_dir: str = ""


def _rank(rank: int, world: int, kind: str, cfg: RunConfig, opts: Options, trace: str, out: dict) -> None:
    from data.stream import build_train_loader
    from train.dist import DistEnv, init_distributed

    env = DistEnv(rank, world, rank, world)
    device, _ = init_distributed(env)
    runner: BareLoop | OurStep = BareLoop(cfg, device, world) if kind == "bare" else OurStep(cfg, env, device)
    loader = build_train_loader(cfg.data, rank, world) if opts.data in ("stream", "shards") else None
    batches = iter(loader) if loader is not None else synthetic_batches(cfg, rank, device)
    timer = Timer(device)
    first_s = None  # compile, the allocator's and the libraries' first calls
    for i in range(opts.warmup):
        start = time.perf_counter()
        runner.step(batches, None)
        if i == 0:
            timer.sync()
            first_s = time.perf_counter() - start
    dist.barrier()
    times = []
    for _ in range(opts.steps):  # the median step: robust to the other processes of a shared machine
        timer.sync()
        start = time.perf_counter()
        runner.step(batches, None)
        timer.sync()
        times.append(time.perf_counter() - start)
    dist.barrier()
    seconds = statistics.median(times)
    breakdown = Timer(device)
    with timed_collectives(breakdown):
        for _ in range(max(3, opts.steps // 3)):
            runner.step(batches, breakdown)
    n = max(3, opts.steps // 3)
    counter = OpCounter(device)
    if opts.count_ops:
        runner.step(batches, counter)
    profiled = profile_step(runner, batches, device, trace if rank == 0 else "") if opts.profile else None
    out[rank] = {
        "ops": counter.ops,
        "profile": profiled,
        "step_s": seconds,
        "first_s": first_s,
        "mem_mb": peak_memory_mb(device),
        "reserved_mb": peak_reserved_mb(device),
        "phases": {k: v / n for k, v in breakdown.totals.items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if loader is not None:
        loader.close()
    dist.destroy_process_group()


def check_measurable(cfg: RunConfig) -> None:
    """Refuse what the table cannot count right: one step here is one micro-batch per rank."""
    if cfg.optim.grad_accum_steps != 1:
        raise ValueError(
            f"bench.train measures one micro-batch per step: optim.grad_accum_steps={cfg.optim.grad_accum_steps} "
            "would run that many in each of our steps against one in the bare loop's (and the breakdown would "
            "step the engine before the boundary), so img/s, MFU and vs bare would be wrong; set "
            "optim.grad_accum_steps=1 (a larger data.batch_size measures a larger step)"
        )


def measure(kind: str, cfg: RunConfig, world: int, opts: Options, trace: str = "") -> dict[str, Any]:
    check_measurable(cfg)
    with empty_compile_cache(cfg.model.compile):
        res = run_ranks(_rank, world, kind, cfg, opts, trace)
    reserved = [r["reserved_mb"] for r in res.values() if r["reserved_mb"] is not None]
    return {
        "kind": kind,
        "images": cfg.data.batch_size,  # per rank and step (one micro-batch)
        "ops": res[0]["ops"],
        "profile": res[0]["profile"],
        "step_s": max(r["step_s"] for r in res.values()),
        "first_s": None if res[0]["first_s"] is None else max(r["first_s"] for r in res.values()),
        "mem_mb": max(r["mem_mb"] for r in res.values()),
        "reserved_mb": max(reserved) if reserved else None,
        "phases": res[0]["phases"],
        "flops": forward_flops_per_image(cfg),
        "device": res[0]["device"],
        "estimate_mb": planned_mb(cfg) if kind == "ours" else None,
    }


def report(name: str, row: dict[str, Any], bare: dict[str, Any], cfg: RunConfig, world: int) -> str:
    ph = row["phases"]
    total = sum(ph.get(k, 0.0) for k in PHASES)
    cells = [f"{1e3 * ph.get(k, 0.0):.1f}" for k in PHASES]
    cells.append("n/a" if row["kind"] == "bare" else f"{1e3 * ph.get('comm', 0.0):.1f}")  # DDP's is in C++
    img = row["images"] * world / row["step_s"]
    per_image = (row["step_s"] / row["images"]) / (bare["step_s"] / bare["images"])  # bare img/s / row img/s
    memory = f"{row['mem_mb']:.0f}"
    if row.get("reserved_mb") is not None:  # CUDA: allocated / reserved by the caching allocator
        memory += f" / {row['reserved_mb']:.0f}"
    if row.get("estimate_mb") is not None:
        memory += f" (est. {row['estimate_mb']:.0f})"
    return (
        f"| {name} | {world} | {img:.0f} | {img / world:.0f} | {1e3 * row['step_s']:.1f} | {per_image:.2f}x | "
        + " | ".join(cells)
        + f" | {100 * ph.get('head', 0.0) / max(total, 1e-12):.0f}% | {memory} | {mfu(row, cfg, world)} | "
        + ("-" if row.get("first_s") is None else f"{row['first_s']:.1f}")
        + " |"
    )


def trace_path(opts: Options, row: str, world: int) -> str:
    if not opts.trace_dir:
        return ""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in row)
    return os.path.join(opts.trace_dir, f"{safe}-P{world}.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="mnist_distarc")
    p.add_argument("--world", default="1,2", help="comma-separated numbers of ranks")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--data",
        choices=("synthetic", "stream", "shards"),
        default="synthetic",
        help="synthetic: fixed uint8 batches in memory; stream: the recipe's WebDataset loader on its data "
        "(the digits are written when missing); shards: that loader on --images synthetic JPEGs",
    )
    p.add_argument("--images", type=int, default=4096, help="--data shards: how many JPEGs")
    p.add_argument(
        "--classes", type=int, default=85_742, help="--data shards: classes when the recipe reads them from data"
    )
    p.add_argument(
        "--source", default="", help="--data shards: source size WxH (default: the recipe's image size, square)"
    )
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=v,key=v")
    p.add_argument("--no-variants", action="store_true", help="only the bare and ours rows")
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="also count the aten ops of one step per phase (kernel launches on a GPU) and print them",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step per row (torch.profiler): top ops by self time and, on CUDA, GPU busy %%",
    )
    p.add_argument("--trace-dir", default="", help="with --profile: write each row's Chrome trace here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()  # key=value overrides may come before or after the switches
    opts = Options(args.steps, args.warmup, args.data, args.count_ops, args.profile, args.trace_dir)
    for _, extra in variant_overrides(args):  # before any data is written or process started
        check_measurable(apply_overrides(get_recipe(args.recipe), [*args.overrides, *extra]))
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="bench-shards-") if args.data == "shards" else ""
    try:
        if folder:
            args.overrides = [*args.overrides, *write_shards(args, folder)]
        run_rows(args, opts)
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def write_shards(args: argparse.Namespace, folder: str) -> list[str]:
    """--data shards: write the synthetic set every row reads through the recipe's own loader into `folder`;
    the overrides that point the recipe at it (its class count too: the recipe may read it from its data)."""
    raw = apply_overrides(get_recipe(args.recipe), args.overrides)  # not resolved: no data yet
    classes = raw.data.num_classes or args.classes
    start = time.perf_counter()
    write_jpeg_shards(raw.data, folder, args.images, classes, args.source)
    print(f"# {args.images} synthetic JPEGs, {classes:,} classes -> {folder} in {time.perf_counter() - start:.0f} s")
    return [f"data.root={folder}", "data.prepare=none", f"data.num_classes={classes}"]


def variant_overrides(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """("ours", no overrides) and each variant's name and overrides."""
    return [("ours", [])] + [
        (v.split(":", 1)[0], v.split(":", 1)[1].split(","))
        for v in ([] if args.no_variants else list(args.variant or DEFAULT_VARIANTS))
    ]


def run_rows(args: argparse.Namespace, opts: Options) -> None:
    """The bare row and each variant at every world size, printed as measured; then the op counts and
    profiles when asked for. Every row's configuration is built and checked before the first is measured."""
    base = build_config(args.recipe, ["data.uint8_batches=true", *args.overrides]).resolved()
    plan: list[tuple[int, RunConfig, list[tuple[str, RunConfig]]]] = []
    for world in (int(w) for w in args.world.split(",")):
        common = ["data.uint8_batches=true", f"slurm.tasks_per_node={world}", *args.overrides]
        rows = [(name, build_config(args.recipe, [*common, *extra])) for name, extra in variant_overrides(args)]
        plan.append((world, build_config(args.recipe, common), rows))
    if args.data == "stream":
        from data.convert.mnist import ensure_prepared

        ensure_prepared(base.data)
    import timm.layers

    print(
        f"# bench.train: recipe {args.recipe} ({base.model.name}, {base.data.image_size} px, micro-batch "
        f"{base.data.batch_size} per rank, {base.data.num_classes} classes, loss {base.loss.name}, ZeRO-"
        f"{base.zero.stage}, {'bf16' if base.zero.bf16 else 'fp32'}), {args.data} data, {args.steps} steps after "
        f"{args.warmup}; torch {torch.__version__}, {os.cpu_count()} CPU cores, timm fused attention (SDPA): "
        f"{timm.layers.use_fused_attn()}"
    )
    bf16 = "bare: bf16 autocast (fp32 weights, bf16 GEMMs, the classifier's too); ours: bf16 trunk, fp32 head"
    numerics = bf16 if base.zero.bf16 else "fp32 throughout"
    print(
        f"# numerics not matched: {numerics}; TF32 off. vs bare = bare img/s / row img/s (time per image, > 1 is "
        "slower); head ms = the head's forward + backward, fwd / bwd ms = the trunk's; comm n/a for the bare "
        "loop (DDP's all-reduce runs in C++); peak MiB = CUDA max allocated / max reserved, else peak RSS; est. = "
        "--estimate's peak less its runtime reserve, to compare with CUDA's allocated (not with a CPU's RSS); "
        "1st step = the first warm-up step's seconds (compile and first-call costs)"
    )
    print(
        "| row | P | img/s | img/s per rank | ms/step | vs bare (time/img) | data ms | fwd ms | head ms (fwd+bwd) | "
        "bwd ms | optim ms | comm ms (within) | head share | peak MiB/rank | MFU | 1st step s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    measured: list[tuple[str, int, dict[str, Any]]] = []
    for world, cfg, rows in plan:
        bare = measure("bare", cfg, world, opts, trace_path(opts, "bare", world))
        print(report("bare PyTorch loop", bare, bare, cfg, world), flush=True)
        measured.append(("bare PyTorch loop", world, bare))
        for name, vcfg in rows:
            try:
                row = measure("ours", vcfg, world, opts, trace_path(opts, name, world))
            except Exception as err:  # an OOM, a compile with no compiler: the rows after it still run
                print(f"| {name} | {world} | failed: {last_line(err)} |", flush=True)
                print(f"row {name!r} failed:\n{err}", file=sys.stderr, flush=True)  # the whole traceback, to the log
                continue
            print(report(name, row, bare, vcfg, world), flush=True)
            measured.append((name, world, row))
    if args.count_ops:
        print("\n| row | P | " + " | ".join(f"{k} ops" for k in PHASES) + " |")
        print("|---|---|" + "---|" * len(PHASES))
        for name, world, row in measured:
            print(f"| {name} | {world} | " + " | ".join(str(row["ops"].get(k, 0)) for k in PHASES) + " |")
    for name, world, row in measured:
        if row["profile"]:
            busy = row["profile"]["busy"]
            share = "" if busy is None else f", GPU computing (NCCL left out) {100 * busy:.0f}% of the step"
            print(f"\n## profile: {name}, P={world}{share}\n{row['profile']['table']}")


if __name__ == "__main__":
    main()
