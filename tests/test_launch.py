"""Submission-side logic without a cluster: sweeps, sbatch parameters, and the checks made before
anything is queued (the real-Slurm path is exercised in test_slurm_integration.py)."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
from pathlib import Path

from launch.__main__ import build_config, main
from launch.recipes import get_recipe
from model.backbone import build_backbone
from launch.preflight import check_partition, check_weights, check_run_dir, preflight, slurm_partitions
from slurm.executor import slurm_parameters
from train.config import save_yaml


def test_slurm_parameters_from_config() -> None:
    cfg = build_config(
        "mnist_distarc",
        [
            "slurm.nodes=2",
            "slurm.tasks_per_node=4",
            "slurm.gpus_per_node=4",
            "slurm.partition=gpu",
            "slurm.account=lab",
            "slurm.signal_delay_s=90",
            "slurm.sbatch_extra=constraint=a100;exclusive=true",
            "slurm.setup=module load cuda;echo hi",
        ],
    )
    params = slurm_parameters(cfg.slurm, "job")
    assert params["nodes"] == 2 and params["tasks_per_node"] == 4 and params["gpus_per_node"] == 4
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "lab"
    assert params["slurm_signal_delay_s"] == 90 and params["timeout_min"] == 30
    extra = {"open_mode": "append", "requeue": True, "constraint": "a100", "exclusive": True}  # #SBATCH --requeue
    assert params["slurm_additional_parameters"] == extra
    assert params["slurm_setup"] == ["module load cuda", "echo hi"] and "slurm_qos" not in params
    with pytest.raises(ValueError, match="key=value without dashes"):
        build_config("mnist_distarc", ["slurm.sbatch_extra=--exclusive"])


def test_time_limit_shorter_than_checkpoint_interval_is_refused(capsys) -> None:
    assert main(["slurm.time_min=5", "checkpoint.every_minutes=10"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.every_minutes=10" in err and "slurm.time_min=5" in err


def test_print_config_shows_every_key_without_data(tmp_path, capsys) -> None:
    """--print-config prints the recipe with the overrides applied, as a config.yaml that loads back, and
    needs no converted data (faces read their class count from a manifest that does not exist here)."""
    import yaml

    from train.config import RunConfig
    from train.overrides import apply_overrides

    args = ["--recipe", "vitl_ms1mv2_faces", "--print-config", "optim.lr=0.0002", f"run_root={tmp_path}"]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.0002 and printed["data"]["num_classes"] == 0
    assert RunConfig.from_dict(printed) == apply_overrides(get_recipe("vitl_ms1mv2_faces"), args[3:])
    assert not os.listdir(tmp_path)  # nothing was run or written
    assert main(["--print-config", "optim.lrr=2"]) == 2  # a bad key is still refused, naming the good ones
    assert "'lrr' is not one of" in capsys.readouterr().err
    assert main(["--print-config", "optim.head_optimizer=lion"]) == 2  # and a bad value
    assert "must be one of" in capsys.readouterr().err
    # the recipe label: as an override it renamed the recipe and changed nothing else
    assert main(["--print-config", "recipe=vitl_imagenet_8gpu"]) == 2
    assert "choose the recipe with --recipe vitl_imagenet_8gpu" in capsys.readouterr().err


def test_repeated_keys_unknown_models_and_overrides_after_flags(tmp_path, monkeypatch, capsys) -> None:
    """A key given twice (the last would win without a word) and a model timm does not have (the job would
    fail after its queue wait) are refused before anything runs; overrides may follow the flags."""
    import launch.__main__ as cli

    monkeypatch.setattr(cli, "make_executor", lambda *a: pytest.fail("submitted"))
    assert main(["--print-config", "optim.lr=1e-3", "optim.lr=2e-3"]) == 2
    assert "['optim.lr'] given twice" in capsys.readouterr().err
    assert main(["--print-config", "optim.lr=5e-3", "--sweep", "optim.lr=1e-3,2e-3"]) == 2
    assert "['optim.lr'] both overridden and swept" in capsys.readouterr().err
    assert main(["--print-config", "optim.lr=1e-3", "--recipe", "mnist_chest", "data.batch_size=32"]) == 0
    assert "batch_size: 32" in capsys.readouterr().out
    assert main([f"run_root={tmp_path}", "model.name=resnet10", "data.prepare=none"]) == 2
    assert "model.name='resnet10' is not a timm model; did you mean resnet10t" in capsys.readouterr().err
    from launch import rank

    assert rank.main(["optim.lr=nan", "optim.lr=1"]) == 2  # one line on every rank, not a traceback each
    assert "given twice" in capsys.readouterr().err


def _fake_sinfo(tmp_path, body: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("sinfo", body), ("sbatch", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    return str(bin_dir)


def test_no_slurm_and_unknown_partition_stop_submission(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="sbatch/sinfo are not on PATH"):
        slurm_partitions()
    monkeypatch.setenv("PATH", _fake_sinfo(tmp_path, "echo 'slurm_load_partitions: Unable to contact' >&2; exit 1"))
    with pytest.raises(RuntimeError, match="Unable to contact"):
        slurm_partitions()
    (tmp_path / "bin" / "sinfo").write_text("#!/bin/sh\nprintf 'debug*\\nhigh\\n'\n")
    assert slurm_partitions() == ["debug", "high"]
    cfg = build_config("mnist_distarc", ["slurm.partition=gpu"])
    with pytest.raises(ValueError, match=r"slurm.partition='gpu'.*\['debug', 'high'\]"):
        preflight([cfg], use_slurm=True)
    check_partition(build_config("mnist_distarc", ["slurm.partition=high,debug"]), slurm_partitions())  # a list
    with pytest.raises(ValueError, match=r"slurm.partition='high,gpu': 'gpu' is not a partition"):
        check_partition(build_config("mnist_distarc", ["slurm.partition=high,gpu"]), slurm_partitions())
    (tmp_path / "bin" / "sinfo").write_text('#!/bin/sh\n[ "$1" = --all ] && echo hidden; printf "debug*\\nhigh\\n"\n')
    assert "hidden" in slurm_partitions()  # hidden partitions (sinfo --all) may be named too
    assert main(["--slurm", "slurm.partition=gpu", f"run_root={tmp_path}"]) == 2
    assert "is not a partition of this cluster" in capsys.readouterr().err
    assert not (tmp_path / "mnist_distarc").exists()  # nothing queued, nothing written


def _fake_checkpoint(run_dir, cfg, step: int = 10) -> None:
    path = os.path.join(run_dir, "checkpoints", f"step-{step}")
    os.makedirs(path)
    save_yaml(cfg, os.path.join(path, "config.yaml"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": step, "num_classes": cfg.data.num_classes, "embed_dim": cfg.model.embed_dim}, f)
    os.makedirs(os.path.join(path, "head"))  # the rows of every class (a checkpoint without them is passed over)
    open(os.path.join(path, "head", f"classes-{0:09d}-{cfg.data.num_classes:09d}.pt"), "wb").close()


def test_run_dir_of_another_recipe_or_table_is_refused(tmp_path) -> None:
    chest = build_config("mnist_chest", [f"run_root={tmp_path}", "name=shared"])
    _fake_checkpoint(chest.run_dir, chest)
    check_run_dir(chest)  # its own run dir: fine
    distarc = build_config("mnist_distarc", [f"run_root={tmp_path}", "name=shared"])
    with pytest.raises(ValueError, match="holds checkpoints of recipe 'mnist_chest'.*another run name"):
        check_run_dir(distarc)
    wider = build_config("mnist_chest", [f"run_root={tmp_path}", "name=shared", "data.num_classes=12"])
    with pytest.raises(ValueError, match="holds a table of 10 classes"):
        check_run_dir(wider)


def test_gpu_requests_match_the_tasks_and_bf16_recipes_ask_for_gpus(tmp_path, monkeypatch, capsys) -> None:
    from launch.recipes import RECIPES, get_recipe
    from train.overrides import apply_overrides

    for name in RECIPES:  # a bf16 recipe submitted as shipped gets its GPUs (vitl_imagenet_8gpu asked for none)
        slurm, zero = get_recipe(name).slurm, get_recipe(name).zero
        assert not zero.bf16 or slurm.gpus_per_node == slurm.tasks_per_node > 0, name
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no Slurm: the GPU checks need none
    assert main(["--slurm", "slurm.gpus_per_node=4", f"run_root={tmp_path}"]) == 2  # 2 tasks, 4 GPUs
    assert "set slurm.tasks_per_node=4" in capsys.readouterr().err
    assert apply_overrides(get_recipe("mnist_distarc"), ["slurm.gpus_per_node=4"]).validate()  # local: no matter
    assert main(["--slurm", "zero.bf16=true", f"run_root={tmp_path}"]) == 2
    assert "set slurm.gpus_per_node=2 (one task per GPU)" in capsys.readouterr().err
    assert main(["--slurm", "zero.bf16=true", "slurm.sbatch_extra=constraint=gpu", f"run_root={tmp_path}"]) == 2
    assert "set slurm.gpus_per_node=2" in capsys.readouterr().err  # a constraint named gpu asks for none
    assert main(["--slurm", "zero.bf16=true", "slurm.sbatch_extra=gres=gpu:2", f"run_root={tmp_path}"]) == 2
    assert "no Slurm here" in capsys.readouterr().err  # past the GPU check: gres asks for them
    # a task bound to its own GPU sees it as cuda:0: local rank 1 would fail in cuda.set_device after the queue
    for bound in ("gpus_per_task=1", "gpu_bind=closest"):
        assert main(["--slurm", f"slurm.sbatch_extra=gres=gpu:2;{bound}", f"run_root={tmp_path}"]) == 2
        assert f"asks for {bound}: a task would see only its own GPU" in capsys.readouterr().err
    assert main(["--slurm", "slurm.sbatch_extra=gres=gpu:2;gpu_bind=none", f"run_root={tmp_path}"]) == 2
    assert "no Slurm here" in capsys.readouterr().err


def test_data_the_job_would_refuse_is_refused_at_submission(mnist_root, tmp_path, monkeypatch, capsys) -> None:
    def no_submission(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr("launch.__main__.make_executor", no_submission)
    base = [f"run_root={tmp_path}", f"data.root={mnist_root}", "data.prepare=none"]
    assert main([*base, "data.num_classes=5"]) == 2  # the digits have 10 classes
    assert "set data.num_classes=10" in capsys.readouterr().err
    empty = tmp_path / "empty_split"
    empty.mkdir()
    assert main([f"run_root={tmp_path}", f"data.root={empty}", "data.prepare=none"]) == 2
    assert str(empty) in capsys.readouterr().err
    assert not (tmp_path / "mnist_distarc").exists()  # nothing queued, nothing written


def test_a_recipe_that_needs_pretrained_weights_is_refused_without_them(
    mnist_root, tmp_path, monkeypatch, capsys
) -> None:
    """The CHEST recipes start from ImageNet-21k weights (paper 4.2): without model.checkpoint_path they trained
    from random ones, with no word, to numbers far from the paper's."""
    assert all(get_recipe(f"vits_{d}").model.needs_checkpoint for d in ("cub_chest_1gpu", "cars_chest", "sop_chest"))

    def no_submission(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr("launch.__main__.make_executor", no_submission)
    base = [f"run_root={tmp_path}", f"data.root={mnist_root}", "data.prepare=none", "model.needs_checkpoint=true"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "model.checkpoint_path is empty" in err and "model.needs_checkpoint=false" in err
    assert not (tmp_path / "mnist_distarc").exists()  # nothing queued, nothing written
    # a file the launcher cannot see may be staged onto the nodes: noted here, loaded (or refused) by the job
    named = build_config("mnist_distarc", [*base, "model.checkpoint_path=/nodes/only.pth"])
    check_weights(named)
    assert "/nodes/only.pth not visible from here" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="model.checkpoint_path=/nodes/only.pth does not exist"):
        build_backbone(named.model)


def test_a_run_dir_a_live_job_trains_in_is_refused(tmp_path, monkeypatch) -> None:
    import socket
    import subprocess

    from train.run_owner import OWNER_FILE, record_owner

    cfg = build_config("mnist_distarc", [f"run_root={tmp_path}"])
    os.makedirs(cfg.run_dir)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no squeue: the process check alone
    record_owner(cfg.run_dir, "")  # this very python process, alive
    with pytest.raises(ValueError, match=rf"in use by process {os.getpid()} on {socket.gethostname()}"):
        preflight([cfg], use_slurm=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = json.loads((tmp_path / "mnist_distarc" / OWNER_FILE).read_text())
    (tmp_path / "mnist_distarc" / OWNER_FILE).write_text(json.dumps({**record, "pid": int(gone.stdout)}))
    preflight([cfg], use_slurm=False)  # its job is over: resuming is the normal case
    (tmp_path / "mnist_distarc" / OWNER_FILE).write_text(json.dumps({**record, "pid_start": "1"}))
    preflight([cfg], use_slurm=False)  # this pid, but not the process that started then: reused
    # a Slurm job on another node: squeue decides (%i %A %T; 76_1: the task 77 of array 76 runs; 76_2: another
    # task of that array, whose own id is 78; 77_[1-3]: tasks of array 77 not split off yet, their %A is 77)
    lines = (
        ("77 77 RUNNING", True),
        ("77 77 PENDING", True),
        ("77 77 COMPLETED", False),
        ("77 77 COMPLETING", True),  # also a requeue on its way
        ("76_1 77 RUNNING", True),
        ("76_2 78 RUNNING", False),
        ("77_[1-3] 77 PENDING", False),
    )
    for state, refused in lines:
        monkeypatch.setenv("PATH", _fake_squeue(tmp_path, state))
        (tmp_path / "mnist_distarc" / OWNER_FILE).write_text(
            json.dumps({"slurm_job_id": "77", "host": "node-elsewhere", "pid": 1})
        )
        if refused:
            with pytest.raises(ValueError, match=rf"in use by Slurm job 77 \({state.split()[2]}\).*scancel"):
                preflight([cfg], use_slurm=False)
        else:
            preflight([cfg], use_slurm=False)
    # the record names the job (its Slurm name): the same id under another name is another job (a restarted
    # cluster's ids start again at 1), which had blocked the run dir and been named for scancel
    for line, refused in (("77 77 RUNNING sleep and wait", False), ("77 77 RUNNING mnist_distarc", True)):
        monkeypatch.setenv("PATH", _fake_squeue(tmp_path, line))
        (tmp_path / "mnist_distarc" / OWNER_FILE).write_text(
            json.dumps({"slurm_job_id": "77", "host": "node-elsewhere", "pid": 1, "slurm_job_name": "mnist_distarc"})
        )
        if refused:
            with pytest.raises(ValueError, match=r"in use by Slurm job 77 \(RUNNING\)"):
                preflight([cfg], use_slurm=False)
        else:
            preflight([cfg], use_slurm=False)


def test_a_busy_sweep_names_every_busy_point_and_the_sweeps_own_fix(tmp_path, monkeypatch) -> None:
    """A resubmitted sweep whose points still run: the refusal named the first point only and said `name=...`,
    which a sweep sets itself."""
    from launch.sweep import expand
    from train.run_owner import OWNER_FILE

    _, cfgs = expand("mnist_distarc", [f"run_root={tmp_path}"], ["seed=0,1,2"], "grid")
    monkeypatch.setenv("PATH", _fake_squeue(tmp_path, "77 77 RUNNING grid"))
    for cfg in (cfgs[0], cfgs[2]):
        os.makedirs(cfg.run_dir)
        record = {"slurm_job_id": "77", "host": "node-elsewhere", "pid": 1, "slurm_job_name": "grid"}
        (Path(cfg.run_dir) / OWNER_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError) as err:
        preflight(cfgs, use_slurm=False, sweep=True)
    message = str(err.value)
    assert message.startswith("2 point(s) of this sweep") and "seed=0 (Slurm job 77 (RUNNING))" in message
    assert "seed=2" in message and "seed=1" not in message and "--sweep-name" in message and "name=" not in message


def test_a_slurm_that_does_not_answer_leaves_the_process_check(tmp_path, monkeypatch) -> None:
    from train.run_owner import record_owner, running_owner

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(
        "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    record_owner(str(tmp_path), "42")  # this process, alive, in a job Slurm cannot be asked about
    assert running_owner(str(tmp_path)) == f"process {os.getpid()} on {__import__('socket').gethostname()}"


def _fake_squeue(tmp_path, state: str) -> str:
    bin_dir = tmp_path / "squeue_bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "squeue"
    script.write_text(f'#!/bin/sh\n[ "$3" = 77 ] && [ "$5" = "%i %A %T %j" ] && printf "{state}\\n"\nexit 0\n')
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"


def submissions_without_a_cluster(monkeypatch) -> list:
    """The jobs the launcher submits, caught instead of sent (no preflight, no submission record)."""
    import launch.__main__ as launcher

    submitted: list = []

    class Executor:
        def submit(self, job):
            submitted.append(job)
            return type("Job", (), {"job_id": "1"})()

    monkeypatch.setattr(launcher, "make_executor", lambda *args: Executor())
    monkeypatch.setattr(launcher, "preflight", lambda *args, **kwargs: None)  # no cluster here
    monkeypatch.setattr(launcher, "record_submission", lambda *args, **kwargs: None)
    return submitted


def test_data_written_at_submission_gives_the_class_count(tmp_path, monkeypatch, capsys) -> None:
    """data.num_classes=0 with data the launcher writes itself (the open-set digits): the count comes from the
    manifest just written, on the first submission too (it was checked as 0 classes and refused)."""

    submitted = submissions_without_a_cluster(monkeypatch)
    root = tmp_path / "mnist5k_open"
    args = ["--recipe", "mnist_open_distarc", "--no-wait", f"run_root={tmp_path}"]
    assert main([*args, f"data.root={root}"]) == 0, capsys.readouterr().err
    assert (root / "manifest.json").is_file() and submitted[0].cfg.data.num_classes == 5
    # a GPU submission's memory plan needs the count too (it had said "not known yet")
    gpus = ["slurm.gpus_per_node=2", "slurm.tasks_per_node=2", f"data.root={tmp_path / 'again'}"]
    assert main(["--slurm", *args, *gpus]) == 0, capsys.readouterr().err
    assert submitted[1].cfg.data.num_classes == 5


def test_the_launchers_record_keeps_one_rank_0_wrote_after_the_submission(tmp_path) -> None:
    """Rank 0 may start and record its process before the launcher records the queued job: that record stays."""
    import time

    from train.run_owner import OWNER_FILE, record_owner, record_submission

    since = time.time()
    record_owner(str(tmp_path), "12")
    record_submission(str(tmp_path), "12", since=since)
    assert json.loads((tmp_path / OWNER_FILE).read_text())["pid"] == os.getpid()
    record_submission(str(tmp_path), "13", since=time.time() + 1, job_name="run")  # a later submission replaces it
    assert json.loads((tmp_path / OWNER_FILE).read_text()) | {"submitted_at": 0} == {
        "slurm_job_id": "13",
        "host": __import__("socket").gethostname(),
        "pid": 0,
        "submitted_at": 0,
        "slurm_job_name": "run",
    }


def test_a_job_started_without_the_launcher_refuses_a_run_dir_another_job_trains_in(
    dist_pool, mnist_root: str, tmp_path, monkeypatch
) -> None:
    """slurm/train.sbatch submitted twice under one name skips the launcher's check: rank 0 asks at start,
    and every rank stops before anything is written. Its own record (its Slurm id, or "<array>_<task>" as
    the launcher wrote it, or this process after a resume in it) is not another job."""
    import subprocess

    from tests.test_train import small_overrides
    from train.run_owner import OWNER_FILE, other_owner, record_owner

    monkeypatch.setenv("PATH", f"{tmp_path / 'nothing'}{os.pathsep}/usr/bin{os.pathsep}/bin")  # no squeue
    run_dir = tmp_path / "twice"
    run_dir.mkdir()
    record_owner(str(run_dir), "")
    assert other_owner(str(run_dir)) is None  # this process
    (run_dir / OWNER_FILE).write_text(json.dumps({"slurm_job_id": "76_1", "host": "elsewhere", "pid": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "76")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert other_owner(str(run_dir)) is None  # the record the launcher wrote for this array task
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"slurm_job_id": "", "host": __import__("socket").gethostname(), "pid": other.pid}
        (run_dir / OWNER_FILE).write_text(json.dumps(record))
        assert other_owner(str(run_dir)) == f"process {other.pid} on {record['host']}"
        args = small_overrides(mnist_root, str(tmp_path), "twice", 4)
        (refused,) = dist_pool(1).run(_start_refused, args)
        assert f"in use by process {other.pid}" in refused and "name=" in refused
        assert sorted(os.listdir(run_dir)) == [OWNER_FILE]  # nothing written: no config, no checkpoint
    finally:
        other.kill()


def _start_refused(overrides: list[str]) -> str:
    from train.main import run

    try:
        run(build_config("mnist_distarc", overrides))
    except RuntimeError as exc:
        return str(exc)
    return "started"


@pytest.mark.parametrize(
    "layout, node, expected", [("4", "0", 4), ("3,2", "1", 2), ("2(x3),1", "2", 2), ("2(x3),1", "3", 1)]
)
def test_local_world_size_from_an_srun_steps_layout(monkeypatch, layout: str, node: str, expected: int) -> None:
    from train.dist import env_from_environ

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", layout)
    monkeypatch.setenv("SLURM_NODEID", node)
    assert env_from_environ().local_world_size == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # a launcher's own value wins
    assert env_from_environ().local_world_size == 8


def test_print_config_refuses_an_unknown_model_and_the_sweep_table_has_a_help(capsys) -> None:
    """--print-config checks what a submission checks (the model name too); `python -m launch.sweep --help`
    printed a traceback (it took --help for a folder)."""
    from launch.sweep import main as sweep_main

    assert main(["--print-config", "model.name=nonexistent_net"]) == 2
    assert "model.name='nonexistent_net' is not a timm model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        sweep_main(["--help"])
    assert done.value.code == 0 and "sweep_dir" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        sweep_main(["/nonexistent/sweep"])
    assert done.value.code == 2 and "is not a folder" in capsys.readouterr().err
