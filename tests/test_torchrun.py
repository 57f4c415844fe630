"""`python -m launch.rank` under the launchers users have beside Slurm: torchrun and `accelerate launch`, two CPU
processes each, checked by the run's own summary and its TensorBoard scalars."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.distpool import free_port

STEPS = 6


def train_args(mnist_root: str, run_root: str, name: str) -> list[str]:
    return [
        "-m",
        "launch.rank",
        "--recipe",
        "mnist_distarc",
        f"name={name}",
        f"run_root={run_root}",
        f"data.root={mnist_root}",
        "data.prepare=none",
        f"max_steps={STEPS}",
        "metrics.log_every=3",
        "checkpoint.every_steps=100",
        "checkpoint.export=false",
        "optim.warmup_steps=2",
        "data.num_workers=0",
        "data.eval_split=",
    ]


def check_run(run_dir: str, out: str) -> None:
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["world_size"] == 2 and summary["step"] == STEPS, out[-3000:]
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/skipped_steps", "system/step_time_s", "system/peak_mem_gb"} <= tags, tags
    assert [e.value for e in acc.Scalars("train/skipped_steps")] == [0.0, 0.0]
    assert "\r" not in out  # no progress bar redrawn into a log file


def run_launcher(cmd: list[str]) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def test_torchrun_two_cpu_processes(mnist_root: str, tmp_path) -> None:
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    out = run_launcher([*torchrun, *train_args(mnist_root, str(tmp_path), "torchrun")])
    check_run(str(tmp_path / "torchrun"), out)


@pytest.mark.skipif(
    shutil.which("accelerate") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate")),
    reason="accelerate is not installed",
)
def test_accelerate_launch_two_cpu_processes(mnist_root: str, tmp_path) -> None:
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # --multi_gpu is accelerate's torchrun path (gloo here: no GPU); its --cpu path would need MPI for 2 processes
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    out = run_launcher([*cmd, *train_args(mnist_root, str(tmp_path), "accelerate")])
    check_run(str(tmp_path / "accelerate"), out)
