"""Short runs on CUDA with NCCL, skipped without a GPU: DistArc and CHEST under ZeRO-2 in bf16 through the
launcher, one rank per GPU (2 ranks where the machine has 2 GPUs: NCCL's all-gather / reduce-scatter
branches of the sharded heads and the CUDA tensors of the stop-signal vote). Run with `pytest -m gpu`."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

from launch.__main__ import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def deepspeed_on_cuda(monkeypatch) -> None:
    """tests/conftest.py points DeepSpeed at its CPU accelerator for the CPU suite; the ranks these tests start
    (they inherit the environment) must build their engines on CUDA, or NCCL meets CPU tensors."""
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")


@pytest.mark.parametrize("recipe", ["mnist_distarc", "mnist_chest"])
def test_bf16_zero2_run_on_cuda(recipe: str, mnist_root: str, tmp_path) -> None:
    ranks = min(2, torch.cuda.device_count())
    overrides = [
        f"name={recipe}-gpu",
        f"run_root={tmp_path}",
        f"data.root={mnist_root}",
        "data.prepare=none",
        "max_steps=40",
        "zero.stage=2",
        "zero.bf16=true",
        f"slurm.tasks_per_node={ranks}",
        f"slurm.gpus_per_node={ranks}",
        "metrics.log_every=10",
        "checkpoint.every_steps=20",
        "optim.warmup_steps=5",
    ]
    assert main(["--recipe", recipe, *overrides]) == 0
    summary = json.loads((tmp_path / f"{recipe}-gpu" / "summary.json").read_text())
    assert summary["world_size"] == ranks and summary["step"] == 40
    assert torch.isfinite(torch.tensor(summary["last_train_loss"]))
    top1 = [v for k, v in summary.items() if k.startswith("acc") and isinstance(v, float)]
    assert top1 and max(top1) > 0.3, summary  # 40 steps from scratch: far above the 0.1 of chance


def _cuda_rank(rank: int, world: int, out: dict) -> None:
    """The fused gradient checks and the ZeRO-3 fetch path on one CUDA rank (NCCL), against DeepSpeed's own."""
    import torch.distributed as dist

    from tests.test_fused_grad_checks import compare_with_deepspeed, trajectory as zero2_trajectory
    from tests.test_zero3_leaf_blocks import _both_ranked as leaf_and_plain
    from tests.test_zero3_local_fetch import trajectory as zero3_trajectory
    from train.dist import DistEnv, init_distributed

    # the CPU runs these compare bit for bit; on CUDA, cuDNN and cuBLAS pick their kernels per call unless told not to
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    init_distributed(DistEnv(rank, world, rank, world))
    checks: dict[str, Callable[[], Any]] = {
        "checks": lambda: compare_with_deepspeed(2, True),
        "zero2": lambda: (zero2_trajectory(True), zero2_trajectory(False)),
        "zero3": lambda: (zero3_trajectory(True, False), zero3_trajectory(False, False)),
        "leaf_blocks": lambda: leaf_and_plain(True),  # ZeRO-3 with the ViT's blocks as leaves, checkpointing on
    }
    result: dict[str, Any] = {}
    for name, check in checks.items():  # one that fails keeps the others' results (one device run is all there is)
        try:
            result[name] = check()
        except Exception:  # noqa: BLE001 - reported by the test, with the others
            result[name] = traceback.format_exc()
        out[rank] = result
    dist.destroy_process_group()


def test_deepspeed_replacements_on_cuda() -> None:
    from bench.ranks import run_ranks

    (r,) = run_ranks(_cuda_rank, 1).values()
    failed = {name: value for name, value in r.items() if isinstance(value, str)}
    assert not failed, "\n".join(f"{name}:\n{trace}" for name, trace in failed.items())
    fused, own = r["checks"]["norms"][0::2], r["checks"]["norms"][1::2]
    for a, b in zip(fused, own):  # the multi-tensor CUDA kernel against DeepSpeed's per-tensor norms
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)
    assert all(r["checks"]["overflow"][k] == (True, True) for k in ("nan", "inf", "-inf"))
    assert r["checks"]["overflow"]["finite"] == (False, False)
    ours, deepspeeds = r["zero2"]
    assert ours["norms"] == pytest.approx(deepspeeds["norms"], rel=1e-5)
    ours, deepspeeds = r["zero3"]
    assert deepspeeds["synchronizations"] > 0 and ours["synchronizations"] == 0, (ours, deepspeeds)
    assert ours["local_handles"] > 0
    for p, q in zip(ours["params"], deepspeeds["params"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    leaf, plain = r["leaf_blocks"]
    assert leaf["leaves"] == 2 and leaf["losses"] == plain["losses"] and leaf["fetches"] * 3 < plain["fetches"]
    assert all(torch.equal(a, b) for a, b in zip(leaf["params"], plain["params"]))


@pytest.mark.parametrize("kind", ["lazy_adamw", "lazy_sgd"])
def test_lazy_row_optimizers_on_cuda(kind: str) -> None:
    """The Partial-FC head's row-sparse gradient and the lazy update on CUDA tensors equal the CPU ones
    (which tests/test_lazy_rows.py checks against torch's optimizers)."""
    from model.config import LossConfig
    from model.distarc import DistArcHead
    from train.config import OptimConfig
    from train.engine import build_head_optimizer

    cfg = LossConfig(name="distarc", sample_rate=0.2, radial_weight=0.05, radius_start=2.0, radius_gap=0.5)
    tables = []
    for device in ("cpu", "cuda"):
        head = DistArcHead(cfg, 500, 16).to(device)
        opt, _ = build_head_optimizer(head, OptimConfig(head_optimizer=kind, head_lr=0.1), max_steps=10)
        g = torch.Generator().manual_seed(0)
        for step in range(3):
            emb, labels = torch.randn(32, 16, generator=g), torch.randint(0, 500, (32,), generator=g)
            head(emb.to(device), labels.to(device), step=step)["loss"].backward()
            assert head.weight.grad.is_sparse and head.weight.grad.device.type == device
            opt.step()
            opt.zero_grad(set_to_none=True)
        tables.append(head.weight.detach().cpu())
    torch.testing.assert_close(tables[1], tables[0], rtol=1e-5, atol=1e-6)


def test_a_resumed_run_steps_on_cuda(mnist_root: str, tmp_path) -> None:
    """A resume on CUDA takes its steps: the head's fused AdamW and the engine's, restored through the universal
    checkpoint (zero.bf16 switched off), find their step counts on the GPU (torch's fused kernels refuse a CPU
    one, which a restored head and DeepSpeed's universal load left there)."""
    overrides = [
        "name=resumed-gpu",
        f"run_root={tmp_path}",
        f"data.root={mnist_root}",
        "data.prepare=none",
        "zero.stage=2",
        "slurm.tasks_per_node=1",
        "slurm.gpus_per_node=1",
        "checkpoint.every_steps=10",
        "optim.warmup_steps=2",
        "optim.fused=true",
    ]
    assert main(["--recipe", "mnist_distarc", *overrides, "max_steps=10", "zero.bf16=true"]) == 0
    assert main(["--recipe", "mnist_distarc", *overrides, "max_steps=14", "zero.bf16=false"]) == 0
    summary = json.loads((tmp_path / "resumed-gpu" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["step"] == 14
    assert torch.isfinite(torch.tensor(summary["last_train_loss"]))
