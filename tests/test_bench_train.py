"""bench/train.py runs end to end on CPU (so a device session does not spend its minutes on a broken
benchmark): both rows time every phase, the op counts show DeepSpeed's extra work where it is, and the
profile comes back."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bench.instruments import planned_mb
from bench.train import PHASES, Options, measure
from launch.__main__ import build_config


def test_bare_and_our_rows_measure_count_and_profile(tmp_path) -> None:
    cfg = build_config("mnist_distarc", ["data.uint8_batches=true", "slurm.tasks_per_node=1"]).resolved()
    opts = Options(steps=2, warmup=1, count_ops=True, profile=True, trace_dir=str(tmp_path))
    bare = measure("bare", cfg, 1, opts, str(tmp_path / "bare.json"))
    ours = measure("ours", cfg, 1, opts)
    for row in (bare, ours):
        assert row["step_s"] > 0 and row["mem_mb"] > 0 and row["reserved_mb"] is None  # no CUDA here
        assert row["first_s"] > 0  # the first warm-up step, timed on its own
        assert set(PHASES) <= set(row["phases"]) and all(row["phases"][k] > 0 for k in PHASES)
        assert all(row["ops"].get(k, 0) > 0 for k in ("forward", "backward", "optimizer"))
        assert "aten::" in row["profile"]["table"] and row["profile"]["busy"] is None  # no GPU here
    # our row carries the memory planner's figure for its config (the bare loop has none)
    assert bare["estimate_mb"] is None and ours["estimate_mb"] > 0
    assert ours["estimate_mb"] == pytest.approx(planned_mb(cfg))
    # the same network: the same forward; ZeRO's gradient hooks and checks add ops after it
    assert ours["ops"]["forward"] == bare["ops"]["forward"]
    assert ours["ops"]["backward"] > bare["ops"]["backward"]
    assert (tmp_path / "bare.json").stat().st_size > 0


def test_synthetic_jpeg_shards_feed_the_recipes_loader(tmp_path) -> None:
    """--data shards: the recipe's own loader reads the written set, all classes counted."""
    import json

    from bench.data import write_jpeg_shards
    from data.stream import build_train_loader
    from launch.recipes import get_recipe
    from train.overrides import apply_overrides

    raw = apply_overrides(get_recipe("vitl_ms1mv2_faces"), ["data.num_workers=0", "data.batch_size=8"])
    write_jpeg_shards(raw.data, str(tmp_path), images=128, classes=500, source="")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_classes"] == 500 and manifest["splits"]["train"]["num_samples"] == 128
    cfg = apply_overrides(raw, [f"data.root={tmp_path}", "data.prepare=none"]).resolved()
    assert cfg.data.num_classes == 500
    loader = build_train_loader(cfg.data, 0, 1)
    try:
        images, labels = next(iter(loader))
    finally:
        loader.close()
    assert tuple(images.shape) == (8, 3, 112, 112) and labels.max() < 500


def test_gpu_busy_time_counts_overlapping_kernels_once() -> None:
    from bench.instruments import covered_us

    assert covered_us([]) == 0.0
    assert covered_us([(0, 10), (20, 25)]) == 15  # a gap is idle time
    assert covered_us([(0, 10), (5, 15), (6, 7)]) == 15  # two streams at once: counted once
    assert covered_us([(30, 40), (0, 10), (10, 30)]) == 40  # order does not matter


# --- the audit's findings (each test fails on the code before its fix) ---

SLOW_S = 0.4  # a head's backward made this slow must land in "head ms", not in the trunk's "bwd ms"


class _SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(SLOW_S)
        return grad


def _time_collectives() -> dict[str, Any]:
    """On a pool rank: DeepSpeed's collectives, which reach torch through references of their own (ZeRO's
    all-gathers and reduce-scatters), are timed, each call once."""
    import deepspeed.comm as ds
    from deepspeed.comm import comm as ds_comm

    from bench.instruments import Timer, timed_collectives

    ds.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)  # on the pool's group
    cdb = ds_comm.cdb
    gather_fn, all_reduce = cdb.all_gather_function, dist.all_reduce
    calls: list[str] = []

    class Counting(Timer):
        @contextlib.contextmanager
        def phase(self, name: str) -> Iterator[None]:
            calls.append(name)
            with super().phase(name):
                yield

    timer = Counting(torch.device("cpu"))
    x = torch.ones(4)
    with timed_collectives(timer):
        ds.all_gather_into_tensor(torch.empty(8), x)  # ZeRO's parameter all-gather: cdb.all_gather_function
        ds.reduce_scatter_tensor(torch.empty(2), x)  # its gradient reduce-scatter: cdb.reduce_scatter_function
        ds.all_gather_into_tensor(torch.empty(8), x, async_op=True).wait()
        ds.all_reduce(x)  # DeepSpeed's method calls torch's function: one call, counted once
        dist.all_reduce(x)
    return {
        "calls": calls,
        "comm": timer.totals.get("comm", 0.0),
        "restored": cdb.all_gather_function is gather_fn
        and "all_reduce" not in vars(cdb)
        and dist.all_reduce is all_reduce,
    }


def test_deepspeeds_collectives_count_as_comm_once(dist_pool) -> None:
    for rank in dist_pool(2).run(_time_collectives):
        assert rank["calls"] == ["comm"] * 5 and rank["comm"] > 0
        assert rank["restored"]


def _bare_ranks_after_a_step() -> float:
    """On a pool rank: one bare step on this rank's own batch; the largest difference between the ranks'
    parameters afterwards (DDP must have averaged every gradient, the classifier's too)."""
    from bench.train import BareLoop, synthetic_batches

    cpu = torch.device("cpu")
    cfg = build_config("mnist_distarc", ["data.uint8_batches=true", "slurm.tasks_per_node=2"])
    loop = BareLoop(cfg, cpu, 2)
    loop.step(synthetic_batches(cfg, dist.get_rank(), cpu), None)  # different images on each rank
    flat = torch.cat([p.detach().flatten() for g in loop.optimizer.param_groups for p in g["params"]])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    return float((both[0] - both[1]).abs().max())


def test_bare_loop_all_reduces_the_classifiers_gradient_too(dist_pool) -> None:
    assert dist_pool(2).run(_bare_ranks_after_a_step) == [0.0, 0.0]


def _ours_breakdown_with_a_slow_head_backward() -> dict[str, float]:
    from bench.instruments import Timer
    from bench.train import OurStep, synthetic_batches
    from train.dist import DistEnv

    cpu = torch.device("cpu")
    rank = dist.get_rank()
    cfg = build_config("mnist_distarc", ["data.uint8_batches=true", "slurm.tasks_per_node=2"])
    runner = OurStep(cfg, DistEnv(rank, 2, rank, 2), cpu)
    head = runner.tr.task.head
    forward = head.forward

    def slow(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = forward(*args, **kwargs)
        return {**out, "loss": _SlowBackward.apply(out["loss"])}

    head.forward = slow
    batches = synthetic_batches(cfg, rank, cpu)
    runner.step(batches, None)
    timer = Timer(cpu)
    runner.step(batches, timer)
    return timer.totals


def test_head_ms_holds_the_heads_backward(dist_pool) -> None:
    """The head's backward (ending when the embedding's gradient arrives) counts to "head", the trunk's
    to "backward": in both loops."""
    from bench.instruments import Timer
    from bench.train import PHASES, BareLoop, synthetic_batches

    cpu = torch.device("cpu")
    cfg = build_config("mnist_distarc", ["data.uint8_batches=true", "slurm.tasks_per_node=1"])
    loop = BareLoop(cfg, cpu, 1)
    fc = loop.optimizer.param_groups[0]["params"][-1]  # (found through the optimizer: old and new layouts)
    classifier = next(m for m in _modules(loop) if isinstance(m, nn.Linear) and m.bias is fc)
    forward = classifier.forward
    classifier.forward = lambda x: _SlowBackward.apply(forward(x))  # type: ignore[method-assign]
    batches = synthetic_batches(cfg, 0, cpu)
    loop.step(batches, None)
    timer = Timer(cpu)
    start = time.perf_counter()
    loop.step(batches, timer)
    wall = time.perf_counter() - start
    for totals in [timer.totals, *dist_pool(2).run(_ours_breakdown_with_a_slow_head_backward)]:
        assert totals["head"] >= SLOW_S and totals["backward"] > 0
        assert totals["backward"] < totals["head"]  # the trunk's backward alone: a few ms on this tiny net
    assert sum(timer.totals[k] for k in PHASES) <= wall  # the same interval, split: nothing counted twice


def _modules(loop: Any) -> Iterator[nn.Module]:
    for value in vars(loop).values():
        if isinstance(value, nn.Module):
            yield from value.modules()


def test_grad_accumulation_is_refused_before_anything_runs(monkeypatch) -> None:
    import bench.train

    def no_ranks(*args: Any) -> None:
        raise AssertionError("ranks started")

    monkeypatch.setattr(bench.train, "run_ranks", no_ranks)
    cfg = build_config("mnist_distarc", ["slurm.tasks_per_node=1", "optim.grad_accum_steps=2"])
    with pytest.raises(ValueError, match="one micro-batch per step"):
        measure("ours", cfg, 1, Options(steps=1, warmup=0))
    argv = ["bench.train", "--world", "1", "--variant", "accumulating:optim.grad_accum_steps=2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ValueError, match="one micro-batch per step"):
        bench.train.main()


def _row(kind: str, images: int, step_s: float, device: str = "cpu", reserved: float | None = None) -> dict:
    phases = {"data": 0.001, "forward": 0.01, "head": 0.002, "backward": 0.02, "optimizer": 0.003, "comm": 0.0}
    return {
        "kind": kind,
        "images": images,
        "step_s": step_s,
        "phases": phases,
        "mem_mb": 1000.0,
        "reserved_mb": reserved,
        "flops": 1e11,
        "device": device,
    }


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_vs_bare_is_time_per_image_and_the_bare_comm_is_not_measured() -> None:
    from bench.train import report

    bare_cfg = build_config("mnist_distarc", ["slurm.tasks_per_node=1", "data.batch_size=128"])
    half_cfg = build_config("mnist_distarc", ["slurm.tasks_per_node=1", "data.batch_size=64"])
    bare = _row("bare", 128, 1.0)
    cells = _cells(report("bare PyTorch loop", bare, bare, bare_cfg, 1))
    assert cells[5] == "1.00x" and cells[11] == "n/a" and cells[13] == "1000"  # CPU: peak RSS alone
    half = _row("ours", 64, 0.5, reserved=1500.0)  # half the batch in half the time: the same speed
    cells = _cells(report("recipe (micro-batch 64)", half, bare, half_cfg, 1))
    assert cells[2] == "128" and cells[5] == "1.00x" and cells[11] == "0.0" and cells[13] == "1000 / 1500"
    slower = _row("ours", 64, 1.0)  # half the images per second: twice the time per image
    assert _cells(report("slower", slower, bare, half_cfg, 1))[5] == "2.00x"
    planned = {**half, "estimate_mb": 1234.4}  # our rows: --estimate beside the measured peak
    assert _cells(report("planned", planned, bare, half_cfg, 1))[13] == "1000 / 1500 (est. 1234)"
    assert _cells(report("planned", planned, bare, half_cfg, 1))[15] == "-"  # no warm-up step
    compiled = {**half, "first_s": 41.26}  # the first step's seconds: a compile's cost
    assert _cells(report("compiled", compiled, bare, half_cfg, 1))[15] == "41.3"


@pytest.mark.parametrize(
    ("device", "bf16", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", True, 989.4e12),
        ("NVIDIA H100 80GB HBM3", False, 67e12),  # fp32 without TF32: not the TF32 tensor-core peak
        ("NVIDIA H100 PCIe", True, 756.5e12),
        ("NVIDIA H100 NVL", True, 835.5e12),
        ("NVIDIA H200", True, 989.4e12),
        ("NVIDIA H200", False, 67e12),
        ("NVIDIA A100-SXM4-80GB", False, 19.5e12),
    ],
)
def test_mfu_divides_by_the_parts_own_peak(device: str, bf16: bool, peak: float) -> None:
    from bench.instruments import mfu

    cfg = build_config(
        "mnist_distarc", ["slurm.tasks_per_node=1", "data.batch_size=64", f"zero.bf16={str(bf16).lower()}"]
    )
    row = _row("ours", 64, 0.1, device)
    assert mfu(row, cfg, 1) == f"{100 * 3 * 1e11 * 640 / peak:.1f}%"


def test_a_failing_row_is_reported_and_the_next_rows_still_run(monkeypatch, capsys) -> None:
    """A device run has one try: a row whose ranks raise (an OOM, a compile without a C compiler) prints its
    error as its row, and the rows after it are measured."""
    import argparse

    import bench.train

    def fake_measure(kind: str, cfg, world: int, opts, trace: str = "") -> dict:
        if cfg.optim.lr == 0.123:  # the broken variants, as torch's spawn reports a rank's exception
            raise RuntimeError(
                "-- Process 0 terminated with the following error:\nTraceback (most recent call last):\n"
                '  File "bench/train.py", line 1, in _rank\n'
                "torch.OutOfMemoryError: CUDA out of memory | tried to allocate 2 GiB\n"
            )
        if cfg.optim.lr == 0.456:  # dynamo appends its advice after the exception line
            raise RuntimeError(
                "-- Process 0 terminated with the following error:\nTraceback (most recent call last):\n"
                "torch._inductor.exc.InductorError: InvalidCxxCompiler: No working C++ compiler found\n\n"
                "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're "
                'reporting a bug to PyTorch). For even more developer context, set TORCH_LOGS="+dynamo"\n'
            )
        return {**_row(kind, cfg.data.batch_size, 0.1), "profile": None}

    monkeypatch.setattr(bench.train, "measure", fake_measure)
    args = argparse.Namespace(
        recipe="mnist_distarc",
        overrides=[],
        world="1",
        steps=1,
        warmup=0,
        data="synthetic",
        count_ops=False,
        no_variants=False,
        variant=["broken:optim.lr=0.123", "no compiler:optim.lr=0.456", "after:optim.fused=false"],
    )
    bench.train.run_rows(args, Options(steps=1, warmup=0))
    out, err = capsys.readouterr()
    rows = [_cells(line) for line in out.splitlines() if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["bare PyTorch loop", "ours", "broken", "no compiler", "after"]
    assert rows[2][1:] == ["1", "failed: torch.OutOfMemoryError: CUDA out of memory / tried to allocate 2 GiB"]
    assert rows[3][1:] == [
        "1",
        "failed: torch._inductor.exc.InductorError: InvalidCxxCompiler: No working C++ compiler found",
    ]
    assert rows[4][5] == "1.00x"  # measured and reported as any row
    assert "row 'no compiler' failed:" in err and "Set TORCHDYNAMO_VERBOSE=1" in err  # the whole error, to the log


def test_a_compiling_row_starts_from_an_empty_inductor_cache(monkeypatch) -> None:
    """Its "1st step s" is a cold compile, not a reuse of an earlier row's kernels."""
    import os

    from bench.ranks import empty_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/users/cache")
    with empty_compile_cache(True):
        folder = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert folder != "/users/cache" and os.listdir(folder) == []
    assert not os.path.exists(folder) and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/users/cache"
    with empty_compile_cache(False):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/users/cache"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with empty_compile_cache(True):
        assert "TORCHINDUCTOR_CACHE_DIR" in os.environ
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_forward_flops_of_vit_large_are_the_closed_form() -> None:
    """The MFU's numerator: ViT-L/16 at 224 counted by hand (2 FLOPs per multiply-add): the patch embedding, 24
    blocks of qkv, projection, MLP and the two attention products over 197 tokens, and the 1024 -> 512 neck.
    Per image: the counter runs on a batch of 2 (a missed division reads 2x)."""
    from bench.instruments import forward_flops_per_image

    cfg = build_config("vitl_imagenet_8gpu", [])
    assert (cfg.model.name, cfg.data.image_size, cfg.model.embed_dim) == ("vit_large_patch16_224", 224, 512)
    tokens, dim = 197, 1024
    block = tokens * dim * (3 * dim + dim + 2 * 4 * dim) + 2 * tokens * tokens * dim
    macs = 196 * (3 * 16 * 16) * dim + 24 * block + dim * 512
    assert forward_flops_per_image(cfg) == 2 * macs  # 123.1 GFLOP; x 3 for training: 369.3 (timm's 61.6 GMAC: 369.6)


def _child_peak_mb(queue: Any) -> None:
    from bench.instruments import peak_memory_mb

    queue.put(peak_memory_mb(torch.device("cpu")))


def test_a_spawned_rank_reads_its_own_peak_not_its_parents() -> None:
    """getrusage's ru_maxrss carries the parent's peak across fork + exec: every CPU rank (and bench.convert's
    converter) read at least the launching process's peak. VmHWM is the process's own."""
    import multiprocessing

    from common.procfs import proc_status_mb

    ballast = bytearray(b"\x01") * (800 * 2**20)  # written: resident in this process
    parent = proc_status_mb("VmHWM")["VmHWM"]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_peak_mb, args=(queue,))
    child.start()
    peak = queue.get(timeout=120)
    child.join()
    del ballast
    assert parent >= 800 and peak < parent - 400, (peak, parent)  # the child imports torch (~0.3 GB), no ballast
