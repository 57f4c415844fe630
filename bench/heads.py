"""Benchmark of the class-sharded heads: per-rank peak memory and forward+backward time.

For C classes, D = 512, global batch 256 and world sizes P (gloo processes on this machine):
  * sharded DistArc and CHEST heads vs the dense single-process head (P = 1) where it fits;
  * DistArc vs plain ArcFace (the same sharded head with lambda = mu = 0; P = 1 also PML's ArcFaceLoss);
  * the Gram-form Poincare distance vs a B x N x D broadcast (hyptorch-style);
  * with --sample-rates / --class-chunks, Partial-FC (loss.sample_rate) and the chunked class softmax
    (loss.class_chunk): each head at each rate and chunk, against its plain row;
  * with --head-optimizers, instead: the whole head step (its optimizer's update timed too) per
    optim.head_optimizer, e.g. dense AdamW against the lazy one that updates only the sampled rows.
Memory: on GPUs, torch.cuda.max_memory_allocated; on CPU, the peak resident set of each rank minus
its resident set before the head was built (every configuration runs in fresh processes, because
the peak cannot be reset), with glibc's mmap threshold pinned at 128 KiB so that freed temporaries
go back to the system instead of fragmenting the heap (glibc's dynamic threshold otherwise keeps
blocks up to 32 MiB on the heap and inflates the peak of the small per-rank shards). On a machine
with fewer cores than ranks the per-rank times include oversubscription: compare times at equal P.

    python -m bench.heads [--classes 10000,100000,1000000] [--worlds 1,2,4] [--iters 3]
                          [--heads chest,softtriple --sample-rates 1.0,0.5,0.1 --class-chunks 0,8192]
    python -m bench.heads --heads distarc --classes 1000000 --sample-rates 0.1 --head-optimizers adamw,lazy_adamw
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from bench.ranks import run_ranks
from model.config import ChestConfig, LossConfig
from common.procfs import proc_status_mb

DIM, GLOBAL_BATCH = 512, 256
HEADS = {
    "distarc": LossConfig(name="distarc", form="official", scale=16.0, radial_weight=0.05, phi_weight=1.0),
    "arcface": LossConfig(name="arcface", scale=16.0),
    "chest": LossConfig(name="chest", chest=ChestConfig(proxies_per_class=2, hyp_dim=128, tau=0.5)),
    "softtriple": LossConfig(
        name="softtriple", chest=ChestConfig(proxies_per_class=2, gamma_e=0.1, lambda_e=20.0, delta_e=0.01, tau=0.2)
    ),
}


def current_rss_mb() -> float:
    """Resident anonymous memory now (MiB): tensors and heap, not the libraries' mapped pages."""
    return proc_status_mb("RssAnon")["RssAnon"]


def peak_rss_mb() -> float:
    """The resident peak less the file-backed pages mapped now (MiB): the peak's anonymous part. Library code is
    mapped as it first runs and stays mapped, and how much of it a step maps depends on the page cache (the
    kernel maps cached neighbours of each faulting page), not on the head: the whole resident peak read the
    chunked DistArc probe as 435 MiB alone and up to 482 MiB late in a full test suite."""
    status = proc_status_mb("VmHWM", "RssFile", "RssShmem")
    return status["VmHWM"] - status["RssFile"] - status["RssShmem"]


def _rank(
    rank: int,
    world: int,
    head_name: str,
    num_classes: int,
    iters: int,
    sample_rate: float,
    class_chunk: int,
    head_optimizer: str,
    out: dict,
) -> None:
    import torch.distributed as dist

    from model.task import build_head
    from train.config import OptimConfig
    from train.engine import build_head_optimizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    base = torch.cuda.memory_allocated() / 2**20 if cuda else current_rss_mb()
    cfg = dataclasses.replace(HEADS[head_name], sample_rate=sample_rate, class_chunk=class_chunk)
    head = build_head(cfg, num_classes, DIM, rank, world, embedding_grad_scale=float(world)).to(device)
    optimizer = None  # fwd + bwd only; with a head optimizer its step is timed too
    if head_optimizer:
        optimizer = build_head_optimizer(head, OptimConfig(head_optimizer=head_optimizer), max_steps=iters + 1)[0]
    b = GLOBAL_BATCH // world
    g = torch.Generator().manual_seed(rank)
    emb = (torch.randn(b, DIM, generator=g) * 3).to(device).requires_grad_(True)
    labels = torch.randint(0, num_classes, (b,), generator=g).to(device)
    times = []
    for i in range(iters + 1):
        dist.barrier()
        t0 = time.perf_counter()
        head(emb, labels, step=i)["loss"].backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - t0)
        head.zero_grad(set_to_none=optimizer is not None)
        emb.grad = None
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    out[rank] = {"mem_mb": peak - base, "time_s": min(times[1:])}
    dist.destroy_process_group()


def run_config(
    head_name: str,
    num_classes: int,
    world: int,
    iters: int,
    sample_rate: float = 1.0,
    class_chunk: int = 0,
    head_optimizer: str = "",
) -> dict[str, float]:
    """Per-rank max of peak memory and of the best fwd+bwd time (with `head_optimizer`: fwd + bwd + its step)
    over `iters` timed iterations."""
    res = run_ranks(_rank, world, head_name, num_classes, iters, sample_rate, class_chunk, head_optimizer)
    return {"mem_mb": max(r["mem_mb"] for r in res.values()), "time_s": max(r["time_s"] for r in res.values())}


def time_in_process(head_name: str, num_classes: int, iters: int) -> float:
    """Best fwd+bwd seconds of the whole-table head in this process (default allocator), P = 1."""
    from model.task import build_head

    head = build_head(HEADS[head_name], num_classes, DIM)
    emb = (torch.randn(GLOBAL_BATCH, DIM) * 3).requires_grad_(True)
    labels = torch.randint(0, num_classes, (GLOBAL_BATCH,))
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        head(emb, labels, step=i)["loss"].backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def pml_arcface(num_classes: int, iters: int) -> float:
    """pytorch-metric-learning's dense ArcFaceLoss, fwd+bwd seconds (an external baseline, P = 1)."""
    from pytorch_metric_learning.losses import ArcFaceLoss

    loss_fn = ArcFaceLoss(num_classes=num_classes, embedding_size=DIM, margin=28.6, scale=16)
    emb = (torch.randn(GLOBAL_BATCH, DIM) * 3).requires_grad_(True)
    labels = torch.randint(0, num_classes, (GLOBAL_BATCH,))
    times = []
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        loss_fn(emb, labels).backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def poincare_gram_vs_broadcast(
    batch: int = 256, num: int = 8192, dim: int = 128, iters: int = 3
) -> tuple[float, float]:
    """Seconds for fwd+bwd of all B x N distances: Gram form vs materialised B x N x D Moebius form."""
    from model import hyperbolic as hyp

    c = 0.5
    u = (hyp.expmap0(torch.randn(batch, dim), c)).requires_grad_(True)
    v = (hyp.expmap0(torch.randn(num, dim), c)).requires_grad_(True)

    def broadcast() -> torch.Tensor:  # hyptorch's dist_matrix: mobius_add(-u, v) over a [B, N, D] tensor
        return hyp.dist(u[:, None, :], v[None, :, :], c)

    def gram() -> torch.Tensor:
        return hyp.pairwise_dist(u, v, c)

    out = []
    for fn in (gram, broadcast):
        best = float("inf")
        for _ in range(iters):
            t0 = time.perf_counter()
            fn().sum().backward()
            best = min(best, time.perf_counter() - t0)
        out.append(best)
    torch.testing.assert_close(gram(), broadcast(), rtol=1e-4, atol=1e-4)
    return out[0], out[1]


def variant_table(
    heads: list[str],
    classes: list[int],
    worlds: list[int],
    rates: list[float],
    chunks: list[int],
    iters: int,
    full: dict[tuple[str, int, int], dict[str, float]],
) -> None:
    """Partial-FC (loss.sample_rate) and chunked-softmax (loss.class_chunk) rows: peak memory and time,
    relative to the plain head's run in `full` (rate 1, whole shard at once)."""
    print("\n| head | C | P | sample rate | class chunk | per-rank peak MiB | vs plain | fwd+bwd s | vs plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for head in heads:
        for c in classes:
            for w in worlds:
                base = full[(head, c, w)]
                for rate in rates:
                    for chunk in chunks:
                        plain = rate >= 1.0 and chunk == 0
                        r = base if plain else run_config(head, c, w, iters, rate, chunk)
                        mem, secs = r["mem_mb"], r["time_s"]
                        print(
                            f"| {head} | {c} | {w} | {rate:g} | {chunk or '-'} | {mem:.0f} | "
                            f"{mem / base['mem_mb']:.2f} | {secs:.3f} | {secs / base['time_s']:.2f} |",
                            flush=True,
                        )


def optimizer_table(
    heads: list[str], classes: list[int], rates: list[float], optimizers: list[str], iters: int
) -> None:
    """The head's whole step (forward, backward, its optimizer's update) at P = 1 by optim.head_optimizer: the
    dense optimizers move every row of the table each step, the lazy ones (train/lazy_rows.py) the sampled.
    Run with glibc's default mmap threshold (pinned, as for the memory tables, each [S, D] temporary of the lazy
    update is a fresh mapping whose page faults cost more than the update: 0.20 s against 0.02 s at 20k
    classes), so the peak MiB here includes what glibc keeps of freed memory: bench.capacity measures memory."""
    print("\n| head | C | sample rate | head optimizer | peak MiB | fwd+bwd+step s | vs the first optimizer |")
    print("|---|---|---|---|---|---|---|")
    for head in heads:
        for c in classes:
            for rate in rates:
                first = None
                for opt in optimizers:
                    r = run_config(head, c, 1, iters, rate, 0, opt)
                    first = first or r
                    print(
                        f"| {head} | {c} | {rate:g} | {opt} | {r['mem_mb']:.0f} | {r['time_s']:.3f} | "
                        f"{r['time_s'] / first['time_s']:.2f} |",
                        flush=True,
                    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default="10000,100000,1000000")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--heads", default="distarc,arcface,chest")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--sample-rates", default="", help="Partial-FC rates for a second table, e.g. 1.0,0.5,0.1")
    p.add_argument("--class-chunks", default="", help="loss.class_chunk values for that table, e.g. 0,8192")
    p.add_argument(
        "--head-optimizers",
        default="",
        help="optim.head_optimizer values for a table of whole head steps at P = 1, e.g. adamw,lazy_adamw "
        "(with --sample-rates; only that table and the first are printed)",
    )
    args = p.parse_args()
    if not args.head_optimizers:  # a timing table: pinned, every temporary of the step is a fresh mmap (page faults)
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # read by glibc in the spawned ranks
    classes = [int(c) for c in args.classes.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and max(worlds) > gpus:  # each rank takes cuda:rank (NCCL refuses two ranks on one GPU)
        raise SystemExit(f"--worlds {args.worlds}: each rank takes a GPU and this machine has {gpus}; give --worlds 1")
    print(f"# heads: D={DIM}, global batch {GLOBAL_BATCH}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    if args.head_optimizers:
        rates = [float(r) for r in (args.sample_rates or "1.0").split(",")]
        optimizer_table(args.heads.split(","), classes, rates, args.head_optimizers.split(","), args.iters)
        return
    print("| head | C | P | per-rank peak MiB | dense (P=1) MiB | ratio x P | fwd+bwd s |")
    print("|---|---|---|---|---|---|---|")
    results: dict[tuple[str, int, int], dict[str, float]] = {}
    for head in args.heads.split(","):
        for c in classes:
            for w in worlds:
                r = run_config(head, c, w, args.iters)
                results[(head, c, w)] = r
                dense = results.get((head, c, 1))
                ratio = f"{r['mem_mb'] * w / dense['mem_mb']:.2f}" if dense else "-"
                dense_mb = f"{dense['mem_mb']:.0f}" if dense else "-"
                print(
                    f"| {head} | {c} | {w} | {r['mem_mb']:.0f} | {dense_mb} | {ratio} | {r['time_s']:.3f} |", flush=True
                )
    if "distarc" in args.heads and "arcface" in args.heads:
        print("\n# in this process, on the CPU whatever the machine has (P = 1)")
        print("| C | DistArc s | ArcFace (same sharded head, lambda = mu = 0) s | ratio | PML ArcFaceLoss s |")
        print("|---|---|---|---|---|")
        for c in classes:  # P = 1 in this process, default allocator
            d, a = time_in_process("distarc", c, args.iters), time_in_process("arcface", c, args.iters)
            print(f"| {c} | {d:.3f} | {a:.3f} | {d / a:.2f} | {pml_arcface(c, args.iters):.3f} |", flush=True)
    if args.sample_rates or args.class_chunks:
        variant_table(
            args.heads.split(","),
            classes,
            worlds,
            [float(r) for r in (args.sample_rates or "1.0").split(",")],
            [int(c) for c in (args.class_chunks or "0").split(",")],
            args.iters,
            results,
        )
    gram, bcast = poincare_gram_vs_broadcast()
    print("\n| Poincare distances, B=256 x N=8192, D=128, fwd+bwd, CPU | seconds |\n|---|---|")
    print(
        f"| Gram form (ours) | {gram:.3f} |\n| B x N x D broadcast | {bcast:.3f} |\n| speed-up | {bcast / gram:.1f}x |"
    )


if __name__ == "__main__":
    main()
