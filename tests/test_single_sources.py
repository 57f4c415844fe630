"""One source for each fact: facts that two places used to keep equal by hand, checked where they are used.

Seeds (common.seeds.stable_seed), the class shards behind CHEST's triplets (model.proxies.class_range),
the NCCL settings both launch paths start NCCL with (train.dist.NCCL_DEFAULTS), the requeue exit code
(train.control.REQUEUE_EXIT, also in slurm/train.sbatch), the image field names (data.writer.IMAGE_FIELDS)
and the device of the metric collectives (train.dist.collective_device).
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from common.seeds import stable_seed
from data.samples import BadSampleCounter, valid_samples
from data.writer import IMAGE_FIELDS, LABEL_FIELD, write_split
from model.chest import sample_triplets
from model.proxies import class_range
from tests.test_convert_common import png
from train import control, dist as tdist

REPO = pathlib.Path(__file__).resolve().parent.parent
SBATCH = REPO / "slurm" / "train.sbatch"


# ---- seeds ---------------------------------------------------------------------------------------


def test_stable_seed_is_the_same_in_other_interpreters_and_keeps_the_data_streams_seeds() -> None:
    parts = [(0, 1, 2, 3), (7, 0, 4096), ("triplets", 5), (2**40, "x")]
    code = f"from common.seeds import stable_seed; print([stable_seed(*p) for p in {parts!r}]); print(hash('triplets'))"
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": salt},
        ).stdout.split("\n")
        for salt in ("1", "2")
    ]
    assert runs[0][1] != runs[1][1]  # the salts differ: hash() of a str does...
    assert runs[0][0] == runs[1][0] == str([stable_seed(*p) for p in parts])  # ...stable_seed does not
    # data.stream's per-batch augmentation seed (cfg.seed, rank, worker, k) is the value it had before
    # stable_seed replaced its private helper (sha256 of "0-1-2-3", first 8 bytes little-endian, 63 bits)
    assert stable_seed(0, 1, 2, 3) == 3696716643315174690
    assert all(0 <= stable_seed(*p) < 2**63 for p in parts)


def test_no_seed_in_the_package_comes_from_hash() -> None:
    calls = []
    for package in ("common", "data", "model", "train", "slurm", "launch"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hash":
                    calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls == []


# ---- class shards --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes, world", [(10, 4), (7, 3), (2, 4), (5, 1)])
def test_triplet_negatives_come_from_the_class_range_shards(num_classes: int, world: int) -> None:
    ranges = [class_range(num_classes, r, world) for r in range(world)]
    owner = {c: r for r, (lo, n) in enumerate(ranges) for c in range(lo, lo + n)}
    for mode in ("peer", "local"):
        offsets = set()
        for step in range(6):
            t = sample_triplets(num_classes, 3, world, 0, step, mode)
            offsets.add(t.offset)
            for c in range(num_classes):
                sender = (owner[c] - t.offset) % world
                lo, n = ranges[sender]
                assert (t.offset == 0) == (mode == "local" or world == 1)
                if t.offset == 0:
                    assert bool(t.valid[c]) == (n > 1)
                    if n > 1:
                        assert lo <= int(t.neg_class[c]) < lo + n and int(t.neg_class[c]) != c
                else:
                    assert bool(t.valid[c]) == (n > 0)
                    if n > 0:
                        assert lo <= int(t.neg_class[c]) < lo + n
        if mode == "peer" and world > 2:
            assert len(offsets) > 1  # the peer rotates with the step


# ---- launch paths: NCCL settings and the requeue exit code ---------------------------------------


@pytest.fixture
def saved_environ():
    """init_distributed and export_cluster_env write os.environ: put it back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _no_store(env: tdist.DistEnv, wait_s: int) -> object:
    """rendezvous_store's stand-in where init_process_group is faked: no TCPStore waits for peers."""
    return type("Store", (), {"set_timeout": lambda self, timeout: None})()


def _nccl_env_at_group_creation(monkeypatch) -> dict[str, str]:
    """The NCCL variables set when init_distributed creates an NCCL group (no GPU needed: CUDA is faked)."""
    seen: dict[str, str] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init_process_group(backend: str, **kwargs) -> None:
        assert backend == "nccl"
        seen.update({k: v for k, v in os.environ.items() if "NCCL" in k})

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(tdist, "rendezvous_store", _no_store)
    device, created = tdist.init_distributed(tdist.env_from_environ())
    assert device.type == "cuda" and created
    return seen


def _run_sbatch(
    tmp_path: pathlib.Path, srun_rc: int, restarts: int = 0, **extra_env: str
) -> tuple[int, dict[str, str], list[str]]:
    """Run slurm/train.sbatch with stand-ins for srun and scontrol (PYTHON: this interpreter, unless given).

    Returns the script's exit code, the environment srun got, and scontrol's requeue calls.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f'#!/bin/bash\nenv -0 > "{tmp_path}/srun.env"\nexit {srun_rc}\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\nif [ "$1" = show ]; then echo node1; else echo "$@" >> "{tmp_path}/scontrol.log"; fi\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if "NCCL" not in k}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID="42",
        SLURM_JOB_NODELIST="node1",
        SLURM_NTASKS="2",
        SLURM_RESTART_COUNT=str(restarts),
        PYTHON=sys.executable,
    )
    env.update(extra_env)
    proc = subprocess.run(["bash", str(SBATCH), "--recipe", "x"], env=env, capture_output=True, text=True, cwd=tmp_path)
    if not (tmp_path / "srun.env").exists():  # refused before srun
        return proc.returncode, {"stderr": proc.stderr}, []
    dumped = (tmp_path / "srun.env").read_text().split("\0")
    srun_env = dict(item.split("=", 1) for item in dumped if "=" in item)
    log = tmp_path / "scontrol.log"
    return proc.returncode, srun_env, log.read_text().splitlines() if log.exists() else []


def test_plain_sbatch_refuses_arrays_and_an_interpreter_without_the_project(tmp_path) -> None:
    """An array task would train the same run as its siblings (each refused at start with tracebacks); an
    interpreter without hypermetric failed once per rank after srun started (ModuleNotFoundError)."""
    rc, got, _ = _run_sbatch(tmp_path, 0, SLURM_ARRAY_JOB_ID="41", SLURM_ARRAY_TASK_ID="1")
    assert rc == 2 and "task 1 of array 41" in got["stderr"] and "--sweep" in got["stderr"]
    rc, got, _ = _run_sbatch(tmp_path, 0, PYTHON="/bin/true-not-python")
    assert rc == 2 and "cannot import hypermetric" in got["stderr"] and "PYTHON=" in got["stderr"]
    rc, got, _ = _run_sbatch(tmp_path, 0)
    assert rc == 0 and got.get("SLURM_JOB_ID") == "42"  # srun ran


def test_both_launch_paths_start_nccl_with_the_same_settings(tmp_path, monkeypatch, saved_environ) -> None:
    from slurm.job import export_cluster_env

    # plain sbatch: the ranks inherit what srun got, then `python -m launch.rank` -> init_distributed
    _, srun_env, _ = _run_sbatch(tmp_path, 0)
    for key in [k for k in os.environ if "NCCL" in k]:
        monkeypatch.delenv(key)
    for key, value in srun_env.items():
        if "NCCL" in key:
            monkeypatch.setenv(key, value)
    sbatch_path = _nccl_env_at_group_creation(monkeypatch)
    # submitit: each task runs TrainJob -> export_cluster_env -> run -> init_distributed
    for key in [k for k in os.environ if "NCCL" in k]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for name, value in (
        ("JOB_ID", "42"),
        ("NTASKS", "2"),
        ("JOB_NUM_NODES", "1"),
        ("NODEID", "0"),
        ("GLOBALID", "1"),
        ("LOCALID", "1"),
    ):
        monkeypatch.setenv(f"SUBMITIT_LOCAL_{name}", value)
    export_cluster_env()
    submitit_path = _nccl_env_at_group_creation(monkeypatch)
    assert sbatch_path == submitit_path == tdist.NCCL_DEFAULTS


def test_a_rank_that_sees_only_its_own_gpu_is_told_why(monkeypatch, saved_environ) -> None:
    """Slurm's --gpus-per-task binds each task to its GPU: local rank 1 sees one GPU, and cuda.set_device(1)
    failed with "invalid device ordinal" and no word of why."""
    set_devices: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_devices.append)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "rendezvous_store", _no_store)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("no group may start"))
    with pytest.raises(RuntimeError, match=r"local rank 1 of 4 on its node but sees 1 GPU\(s\) \(CUDA_VISIBLE_DEV"):
        tdist.init_distributed(tdist.DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4))
    assert set_devices == []  # refused before any device is touched
    tdist.check_visible_gpus(tdist.DistEnv(rank=4, world_size=8, local_rank=0, local_world_size=4))  # cuda:0: fine


def test_user_nccl_settings_win_and_cpu_runs_get_none(monkeypatch, saved_environ) -> None:
    for key in [k for k in os.environ if "NCCL" in k]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    assert _nccl_env_at_group_creation(monkeypatch) == {**tdist.NCCL_DEFAULTS, "NCCL_DEBUG": "INFO"}
    for key in [k for k in os.environ if "NCCL" in k]:
        monkeypatch.delenv(key)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: None)
    monkeypatch.setattr(tdist, "rendezvous_store", _no_store)
    assert tdist.init_distributed(tdist.env_from_environ())[0].type == "cpu"
    assert not [k for k in os.environ if "NCCL" in k]  # gloo: nothing to set


def test_requeue_exit_is_one_number_for_submitit_python_m_train_and_the_sbatch_script(tmp_path) -> None:
    import submitit.local.local

    import slurm.job
    import launch.rank

    assert slurm.job.REQUEUE_EXIT is launch.rank.REQUEUE_EXIT is control.REQUEUE_EXIT
    # submitit's LocalExecutor restarts a job on its own code only
    assert control.REQUEUE_EXIT == submitit.local.local.LOCAL_REQUEUE_RETURN_CODE
    assert re.findall(r"^REQUEUE_EXIT=(\d+)$", SBATCH.read_text(), re.M) == [str(control.REQUEUE_EXIT)]
    rc, _, requeues = _run_sbatch(tmp_path, control.REQUEUE_EXIT)
    assert (rc, requeues) == (0, ["requeue 42"])
    for other in (0, 1, 3, 143):  # 3 was python -m train's code before (now launch.rank); 143 = a TERM save
        (tmp_path / "scontrol.log").unlink(missing_ok=True)
        rc, _, requeues = _run_sbatch(tmp_path, other)
        assert (rc, requeues) == (other, [])
    rc, _, requeues = _run_sbatch(tmp_path, control.REQUEUE_EXIT, restarts=30)  # the cap, as submitit's
    assert (rc, requeues) == (control.REQUEUE_EXIT, [])


def test_both_launch_paths_derive_one_master_port_per_job_below_the_ephemeral_ports(
    tmp_path, monkeypatch, saved_environ
) -> None:
    from slurm.job import export_cluster_env, rendezvous_port

    _, srun_env, _ = _run_sbatch(tmp_path, 0)  # SLURM_JOB_ID=42
    assert srun_env["MASTER_PORT"] == str(rendezvous_port("42"))
    ports = set()
    for job_id, task in (("1043", "3"), ("1044", "4")):  # two tasks of one submitit array on Slurm
        monkeypatch.setenv("MASTER_PORT", "29500")  # inherited from the submitting shell: not every job's port
        for name, value in (
            ("JOB_ID", job_id),
            ("ARRAY_JOB_ID", "1040"),
            ("ARRAY_TASK_ID", task),
            ("NTASKS", "2"),
            ("JOB_NUM_NODES", "1"),
            ("NODEID", "0"),
            ("PROCID", "0"),
            ("LOCALID", "0"),
            ("JOB_NODELIST", "node1"),
        ):
            monkeypatch.setenv(f"SLURM_{name}", value)
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        export_cluster_env()
        assert os.environ["MASTER_PORT"] == str(rendezvous_port(job_id)) and os.environ["MASTER_ADDR"] == "node1"
        ports.add(int(os.environ["MASTER_PORT"]))
    assert len(ports) == 2
    # never where outgoing connections take ports: Linux's default range (32768-60999; a host tuned wider is
    # the cluster's choice, not something this test can hold)
    numbers = [rendezvous_port(str(n)) for n in range(50_000)] + [rendezvous_port(f"7_{n}") for n in range(1000)]
    assert 1024 < min(numbers) and max(numbers) < 32768


def test_a_rank_whose_peer_never_comes_fails_within_the_rendezvous_wait() -> None:
    from tests.distpool import free_port

    code = "from train.dist import DistEnv, init_distributed; init_distributed(DistEnv(1, 2, 1, 2))"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "HYPERMETRIC_RENDEZVOUS_S": "2"}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "rank 1 of 2: rendezvous at 127.0.0.1:" in proc.stderr and "HYPERMETRIC_RENDEZVOUS_S" in proc.stderr


# ---- image fields --------------------------------------------------------------------------------


def test_every_image_field_the_writer_takes_is_read_back(tmp_path) -> None:
    image = png(3)
    for field in IMAGE_FIELDS:
        names = write_split([{"__key__": f"s_{field}", field: image, LABEL_FIELD: 2}], str(tmp_path / field), 10)
        counter = BadSampleCounter(0, field)
        got = list(valid_samples([str(tmp_path / field / n) for n in names], 3, counter))
        assert [(s.key, s.image, s.label) for s in got] == [(f"s_{field}", image, 2)] and counter.count == 0
    with pytest.raises(ValueError, match="exactly one of"):
        write_split([{"__key__": "s", "webp": image, LABEL_FIELD: 0}], str(tmp_path / "webp"), 10)


# ---- the device of the metric collectives --------------------------------------------------------


def _metric_collectives() -> dict:
    rank = dist.get_rank()
    ctrl = control.RunControl(0.0, signals=())
    ctrl.received = int(signal.SIGUSR2) if rank == 1 else 0
    return {
        "device": tdist.collective_device().type,
        "mean": tdist.reduce_mean({"a": float(rank), "n": 1.0}, summed=frozenset({"n"})),
        "max": tdist.max_over_ranks(float(rank + 5)),
        "norm": tdist.global_norm([torch.full((2,), float(rank + 1))], [torch.tensor([2.0])]),
        "stop": ctrl.poll().stop_signal,
    }


def test_metric_collectives_on_gloo_match_the_closed_form(dist_pool) -> None:
    # ranks 0, 1: mean of a = 0.5, sum of n = 2; max 6; sqrt(2 * 1 + 2 * 4 + 4) (replicated once)
    expected = {"device": "cpu", "mean": {"a": 0.5, "n": 2.0}, "max": 6.0, "norm": 14**0.5, "stop": int(signal.SIGUSR2)}
    # the norm to the last bits (each tensor's norm is squared back: 1 ulp from the closed form)
    assert dist_pool(2).run(_metric_collectives) == [{**expected, "norm": pytest.approx(14**0.5, rel=1e-15)}] * 2


def test_only_train_dist_picks_the_collective_device() -> None:
    users = [str(p.relative_to(REPO)) for p in (REPO / "train").rglob("*.py") if "get_backend(" in p.read_text()]
    assert users == ["train/dist.py"]


def _clock_windows() -> dict:
    """Rank 1 waits 0.1 s for each batch, rank 0 not at all; an 'evaluation' of 0.3 s between windows."""
    import time as clock_time

    from train.system import StepClock

    rank = dist.get_rank()

    def batches():
        while True:
            clock_time.sleep(0.1 * rank)
            yield 0

    clock = StepClock(8, 2, 10, torch.device("cpu"))
    clock.begin(0)
    timed = clock.timed(batches())
    for _ in range(2):
        next(timed)
        clock_time.sleep(0.05)  # the step itself
    clock_time.sleep(0.3)  # an evaluation: outside the step time, inside the ETA (the loop's state.paused_s)
    clock.reset(2)
    for _ in range(2):
        next(timed)
        clock_time.sleep(0.05)
    return clock.window(4, paused_s=0.3)


def test_system_scalars_show_the_rank_that_waits_and_an_eta_with_evaluations(dist_pool) -> None:
    windows = dist_pool(2).run(_clock_windows)
    assert windows[0]["data_wait_frac"] == windows[1]["data_wait_frac"] == pytest.approx(2 / 3, abs=0.1)
    assert windows[0]["data_wait_frac_mean"] < 0.05  # this rank's own share (the logger averages it)
    for w in windows:  # ETA: 6 steps left at the step time plus the evaluation's 0.3 s spread over 4 steps
        assert w["eta_min"] * 60 / 6 == pytest.approx(w["step_time_s"] + 0.3 / 4)


def test_a_requeued_jobs_eta_has_the_runs_evaluations_before_its_own() -> None:
    """The ETA spreads the run's evaluation and save time (TrainState.paused_s, in every checkpoint) over the
    steps so far: a job resumed at step 100 of 200 has it from its first log step, before any evaluation of its
    own (it counted only its own pauses, ~37% low until its first evaluation at 1 s/step, 10 min every 1000)."""
    import time

    from train.system import StepClock

    clock = StepClock(8, 1, 200, torch.device("cpu"))
    clock.begin(100)
    time.sleep(0.2)
    w = clock.window(102, paused_s=51.0)  # 50 s of evaluations and 1 s of saves over the first 102 steps
    assert w["eta_min"] * 60 == pytest.approx(98 * (w["step_time_s"] + 0.5), rel=1e-6)


def test_peak_memory_is_each_log_windows_own() -> None:
    """system/peak_mem_gb was the peak since the process started: after one high point (an evaluation's) every
    later window showed it, and memory that grew under it never did."""
    from train.system import StepClock

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # some sandboxes have no clear_refs: there the CPU peak runs from the start (CUDA's resets)
        pytest.skip("/proc/self/clear_refs cannot reset this process's peak resident set here")
    cpu = torch.device("cpu")
    clock = StepClock(8, 1, 10, cpu)
    clock.window(1)  # ends the window that holds whatever this process did before
    torch.ones(50 * 2**20).sum()  # 200 MiB touched, and freed: an evaluation's peak
    clock.reset(1)  # as after an evaluation or a save: their peaks stay in the window
    high = clock.window(2)["peak_mem_gb"]
    low = clock.window(3)["peak_mem_gb"]
    assert high - low > 150 / 1024, (high, low)
    torch.ones(25 * 2**20).sum()  # 100 MiB: a window's growth shows though it stays under the first peak
    grown = clock.window(4)["peak_mem_gb"]
    assert 70 / 1024 < grown - low < high - low, (low, grown, high)
