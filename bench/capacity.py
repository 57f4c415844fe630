"""The largest class table one device trains, exact and with Partial-FC sampling (loss.sample_rate).

For each head and sample rate: the largest number of classes C whose training step of the head (forward,
backward and the head's AdamW step from train/engine.py, D = 512, batch 256, one rank) peaks within the
budget: on a GPU all of its memory less --reserve-gb (what the backbone needs: launch/estimate.py sizes
it), on CPU --budget-gb. Found by doubling from --start and bisecting to --tolerance; on a GPU every probe
runs in this process (an out-of-memory error is caught and the cache emptied), on CPU in a fresh process
(its peak resident set above its baseline, with glibc's mmap threshold pinned as bench/heads.py does).
With P ranks each holds C / P rows, so a node of P such devices trains about P x the table.
The reference is Partial FC (An et al.): 5.5M classes exact and 29M sampled on 8 x 32 GB GPUs, its ResNet
trunk included; the table prints classes per GiB of budget beside theirs (theirs per GB of all 8 GPUs).

    python -m bench.capacity [--heads distarc,chest] [--sample-rates 1.0,0.1] [--class-chunks 0,8192] [--budget-gb G]
                             [--head-optimizers adamw,sgd] [--reserve-gb R] [--start 1000000] [--tolerance 0.02]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time
from typing import Callable
from unittest import mock

import torch

from bench.heads import DIM, GLOBAL_BATCH, HEADS, current_rss_mb, peak_rss_mb
from bench.ranks import run_ranks
from model.config import LossConfig

# Partial FC's largest tables on 8 x 32 GB: exact softmax, and sampled (its rate 0.1)
PARTIAL_FC = {1.0: 5.5e6, 0.1: 29e6}
PARTIAL_FC_GB = 8 * 32


def largest_fitting(fits: Callable[[int], bool], start: int, tolerance: float) -> tuple[int, int]:
    """(largest count known to fit, smallest known not to) for a monotone `fits`: doubling from `start`
    while it fits, then bisection until the two are within `tolerance` of each other."""
    lo, hi = 0, max(1, start)
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > max(1.0, tolerance * hi):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi


def train_head_steps(
    cfg: LossConfig, num_classes: int, device: torch.device, head_optimizer: str = "adamw", fused: bool = True
) -> None:
    """Two training steps of the head alone at `num_classes` (the second with the optimizer's state allocated);
    `fused`: optim.fused (false: torch's unfused AdamW, per tensor on CPU, foreach on CUDA)."""
    from model.task import build_head
    from train.config import OptimConfig
    from train.engine import build_head_optimizer

    def random_rows(seed: int, class_start: int, num_local: int, row_shape: tuple[int, ...]) -> torch.Tensor:
        # on the device: init_rows' reproducible per-class rows cost ~3 s per million classes on one CPU core,
        # and this search builds tens of millions; only the table's size matters here
        return torch.randn((num_local, *row_shape), device=device)

    with mock.patch("model.distarc.init_rows", random_rows), mock.patch("model.chest.init_rows", random_rows):
        head = build_head(cfg, num_classes, DIM).to(device)
    optimizer, _ = build_head_optimizer(head, OptimConfig(head_optimizer=head_optimizer, fused=fused), max_steps=10)
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(GLOBAL_BATCH, DIM, generator=g) * 3).to(device).requires_grad_(True)
    labels = torch.randint(0, num_classes, (GLOBAL_BATCH,), generator=g).to(device)
    for step in range(2):
        head(emb, labels, step=step)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def describe(cfg: LossConfig, head_optimizer: str) -> str:
    return f"{cfg.name} rate {cfg.sample_rate:g} chunk {cfg.class_chunk} {head_optimizer}"


def cuda_fits(cfg: LossConfig, budget_bytes: float, head_optimizer: str) -> Callable[[int], bool]:
    device = torch.device("cuda")

    def fits(num_classes: int) -> bool:
        gc.collect()  # a failed probe's tensors (held by its traceback's frames) before the next one measures
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            train_head_steps(cfg, num_classes, device, head_optimizer)
            peak = torch.cuda.max_memory_allocated(device) - base
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError, or cuBLAS failing to allocate its workspace
            if not isinstance(err, torch.cuda.OutOfMemoryError) and "ALLOC_FAILED" not in str(err):
                raise
            peak = float("inf")
        gc.collect()
        torch.cuda.empty_cache()
        print(f"  {describe(cfg, head_optimizer)}: {num_classes:,} classes -> {peak / 2**30:.1f} GiB", flush=True)
        return peak <= budget_bytes

    return fits


def _cpu_probe(
    rank: int, world: int, cfg: LossConfig, num_classes: int, head_optimizer: str, out: dict, fused: bool = True
) -> None:
    # the modules train_head_steps imports, before the baseline: DeepSpeed's import (~170 MiB resident) is no
    # part of the head (until 2026-12-06 it was counted: the CPU rows of docs/benchmarks.md are that much low)
    import model.task  # noqa: F401
    import train.engine  # noqa: F401

    base = current_rss_mb()
    train_head_steps(cfg, num_classes, torch.device("cpu"), head_optimizer, fused)
    out[rank] = {"mem_mb": peak_rss_mb() - base}


def cpu_fits(cfg: LossConfig, budget_bytes: float, head_optimizer: str) -> Callable[[int], bool]:
    def fits(num_classes: int) -> bool:
        peak = run_ranks(_cpu_probe, 1, cfg, num_classes, head_optimizer)[0]["mem_mb"] * 2**20
        print(f"  {describe(cfg, head_optimizer)}: {num_classes:,} classes -> {peak / 2**30:.2f} GiB", flush=True)
        return peak <= budget_bytes

    return fits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", default="distarc,chest")
    p.add_argument("--sample-rates", default="1.0,0.1")
    p.add_argument("--class-chunks", default="0,8192", help="loss.class_chunk values (0 = the whole shard at once)")
    p.add_argument(
        "--head-optimizers", default="adamw", help="optim.head_optimizer values (adamw, sgd, lazy_adamw, lazy_sgd)"
    )
    p.add_argument("--budget-gb", type=float, default=0.0, help="memory budget (GiB); default on a GPU: all of it")
    p.add_argument("--reserve-gb", type=float, default=0.0, help="left for the backbone and the runtime (GiB)")
    p.add_argument("--start", type=int, default=1_000_000, help="first class count probed (doubled while it fits)")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative width of the final bracket")
    args = p.parse_args()
    # as bench.heads: freed temporaries go back to the system (read by glibc in the probe processes), else
    # glibc keeps up to 32 MiB blocks on the heap and the resident peak counts ~20% of already-freed memory
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    cuda = torch.cuda.is_available()
    if cuda:
        total = torch.cuda.mem_get_info()[1]
        budget = (args.budget_gb * 2**30 if args.budget_gb else total) - args.reserve_gb * 2**30
        where = f"{torch.cuda.get_device_name()} ({total / 2**30:.0f} GiB)"
    elif args.budget_gb:
        budget, where = (args.budget_gb - args.reserve_gb) * 2**30, "CPU"
    else:
        raise SystemExit("bench.capacity on CPU needs --budget-gb (the machine's memory is not a safe limit)")
    print(
        f"# capacity: {where}, budget {budget / 2**30:.1f} GiB for the head (reserve {args.reserve_gb:g} GiB), "
        f"D={DIM}, batch {GLOBAL_BATCH}, one rank, torch {torch.__version__}"
    )
    print(
        "| head | sample rate | class chunk | head optimizer | largest C that fits | first C that does not | "
        "classes per GiB | Partial FC classes per GiB (8 x 32 GB) | search s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    configs = [
        (dataclasses.replace(HEADS[head], sample_rate=float(rate), class_chunk=int(chunk)), opt)
        for head in args.heads.split(",")
        for rate in args.sample_rates.split(",")
        for chunk in args.class_chunks.split(",")
        for opt in args.head_optimizers.split(",")
    ]
    for cfg, opt in configs:  # each row as soon as its search ends (a cut-off run keeps the rest)
        fits = (cuda_fits if cuda else cpu_fits)(cfg, budget, opt)
        start = time.perf_counter()
        lo, hi = largest_fitting(fits, args.start, args.tolerance)
        ref = PARTIAL_FC.get(cfg.sample_rate)
        ref_cell = f"{ref / PARTIAL_FC_GB:,.0f}" if ref else "-"
        print(
            f"| {cfg.name} | {cfg.sample_rate:g} | {cfg.class_chunk or '-'} | {opt} | {lo:,} | {hi:,} | "
            f"{lo / (budget / 2**30):,.0f} | {ref_cell} | {time.perf_counter() - start:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
