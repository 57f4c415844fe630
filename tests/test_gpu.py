"""Short runs on CUDA with NCCL, skipped without a GPU: DistArc and CHEST under ZeRO-2 in bf16 through the
launcher, one rank per GPU (2 ranks where the machine has 2 GPUs: NCCL's all-gather / reduce-scatter
branches of the sharded heads and the CUDA tensors of the stop-signal vote). Run with `pytest -m gpu`."""

from __future__ import annotations

import json

import pytest
import torch

from launch.__main__ import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


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
