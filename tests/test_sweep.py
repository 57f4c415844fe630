"""Sweeps without a cluster: the grid, its folders, the refusal of what one job array cannot honour, and the
summary table (the real job array is exercised in test_slurm_train.py)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

import launch.__main__ as launcher
from launch.sweep import (
    default_sweep_name,
    MANIFEST_FILE,
    SUMMARY_FILE,
    expand,
    parse_grid,
    point_label,
    summary_rows,
    summary_table,
)
from launch.sweep import varying_keys, write_summary
from launch.recipes import get_recipe
from train.config import RunConfig, SlurmConfig, save_yaml
from train.overrides import apply_overrides
from train.summary import RunSummary


def test_chest_margin_grid_is_sixteen_runs(tmp_path: Path) -> None:
    sweep_dir, cfgs = expand(
        "mnist_chest", [f"run_root={tmp_path}"], ["loss.chest.delta_h=1,5,10,20", "loss.chest.delta_e=1,5,10,20"]
    )
    assert os.path.dirname(sweep_dir) == str(tmp_path) and os.path.basename(sweep_dir).startswith("mnist_chest-sweep-")
    assert len(cfgs) == 16
    assert {(c.loss.chest.delta_h, c.loss.chest.delta_e) for c in cfgs} == {
        (h, e) for h in (1.0, 5.0, 10.0, 20.0) for e in (1.0, 5.0, 10.0, 20.0)
    }
    assert len({c.run_dir for c in cfgs}) == 16 and all(c.run_dir.startswith(sweep_dir + os.sep) for c in cfgs)
    assert cfgs[1].name == "delta_h=1_delta_e=5" and all(c.recipe == "mnist_chest" for c in cfgs)


def test_sweep_over_recipes_and_bad_grids(tmp_path: Path) -> None:
    _, cfgs = expand("mnist_distarc", [f"run_root={tmp_path}"], ["recipe=mnist_distarc,mnist_chest", "seed=0,1"])
    assert [(c.recipe, c.seed, c.loss.name) for c in cfgs] == [
        ("mnist_distarc", 0, "distarc"),
        ("mnist_distarc", 1, "distarc"),
        ("mnist_chest", 0, "chest"),
        ("mnist_chest", 1, "chest"),
    ]
    assert point_label([("a.x", "1"), ("b.x", "p/q")]).startswith("a.x=1_b.x=p-q~")
    assert point_label([("root", "/d/a-b")]) != point_label([("root", "/d/a/b")])  # both were root=-d-a-b
    with pytest.raises(ValueError, match="key=value1,value2"):
        parse_grid(["loss.margin"])
    with pytest.raises(ValueError, match="names a key twice"):
        parse_grid(["seed=1,2", "seed=3"])
    with pytest.raises(ValueError, match="lists 1 more than once"):  # two array tasks in one folder
        parse_grid(["seed=1,2,1"])
    with pytest.raises(ValueError, match="slurm.tasks_per_node differs"):
        expand("mnist_distarc", [], ["slurm.tasks_per_node=1,2"])
    with pytest.raises(ValueError, match="names its points' folders itself.*run_root= as a plain override"):
        parse_grid([f"run_root={tmp_path}/a,{tmp_path}/b"])  # was overridden by the sweep's own, without a word
    long_root = "/data/" + "x" * 240
    with pytest.raises(ValueError, match="bytes, more than a file name may be"):  # failed at the first save
        expand("mnist_distarc", [f"run_root={tmp_path}"], [f"data.root={long_root}1,{long_root}2"])


def test_sweep_folder_is_a_function_of_the_whole_grid(tmp_path: Path) -> None:
    """Two sweeps of one recipe over other keys shared runs/<recipe>-sweep-<digest> (the digest ignored the
    --sweep specs): the second resumed the first's points whose labels matched, the table listed both."""
    root = f"run_root={tmp_path}"

    def folder(overrides: list[str], specs: list[str]) -> str:
        return expand("mnist_distarc", [root, *overrides], specs)[0]

    lr = folder([], ["optim.lr=0.001,0.003"])
    assert lr != folder([], ["loss.margin=0.3,0.5"])
    assert lr != folder([], ["optim.lr=0.001,0.01"])  # other values of the same key
    assert folder([], ["seed=0"]) != folder([], ["seed=0", "optim.lr=0.001"])  # one more key
    assert lr != folder(["optim.head_lr=0.01"], ["optim.lr=0.001,0.003"])  # other training settings
    # the same sweep again resumes in its folder: value order, spacing, run_root and slurm.* do not matter
    assert lr == folder([], ["optim.lr=0.003, 0.001"]) == folder(["slurm.time_min=40"], ["optim.lr=0.001,0.003"])
    assert os.path.basename(lr).startswith("mnist_distarc-sweep-") and os.path.dirname(lr) == str(tmp_path)
    assert expand("mnist_distarc", [root], ["seed=0,1"], "grid")[0] == str(tmp_path / "grid")  # --sweep-name
    # name=... over two recipes with one grid: two sweeps (the digest left the recipe out)
    named = [expand(recipe, [root, "name=study"], ["seed=0,1"])[0] for recipe in ("mnist_distarc", "mnist_chest")]
    assert named[0] != named[1] and all(os.path.basename(f).startswith("study-sweep-") for f in named)


@pytest.mark.parametrize(
    "specs, overrides, key",
    [
        (["slurm.cpus_per_task=1,8"], [], "slurm.cpus_per_task"),
        (["slurm.partition=debug,high"], [], "slurm.partition"),
        (["slurm.mem_gb=4,8", "seed=0,1"], [], "slurm.mem_gb"),
        (["slurm.sbatch_extra=constraint=a100,constraint=h100"], [], "slurm.sbatch_extra"),
        # via recipes: 8 tasks, 10 CPUs each and 2 days against the default's 2 x 1 CPU for 30 min; the
        # overrides equalise the shape the old check compared, the CPUs still differ
        (
            ["recipe=mnist_distarc,vitl_imagenet_8gpu"],
            ["slurm.tasks_per_node=2", "slurm.gpus_per_node=2", "slurm.time_min=60"],
            "slurm.cpus_per_task",
        ),
    ],
)
def test_points_that_differ_in_any_slurm_setting_are_refused(
    tmp_path: Path, specs: list[str], overrides: list[str], key: str
) -> None:
    """The array is submitted once with point 0's slurm.* settings: any other value was silently ignored."""
    with pytest.raises(ValueError) as err:
        expand("mnist_distarc", [f"run_root={tmp_path}", *overrides], specs)
    message = str(err.value)
    assert f"{key} differs" in message and "submit separate sweeps" in message and f"give {key}=" in message


def test_refused_sweep_submits_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    submitted = _fake_submission(monkeypatch)
    args = ["--slurm", "--no-wait", "--sweep", "slurm.partition=debug,high", f"run_root={tmp_path}"]
    assert launcher.main(args) == 2
    err = capsys.readouterr().err
    assert "slurm.partition differs" in err and "'debug' at partition=debug, 'high' at partition=high" in err
    assert submitted == [] and not os.listdir(tmp_path)
    # one partition for every point is fine (and reaches the submission)
    assert launcher.main(["--slurm", "--no-wait", "--sweep", "seed=0,1", "slurm.partition=high", *args[4:]]) == 0
    assert [partition for partition, _ in submitted] == ["high", "high"]


def test_submission_records_the_grid_and_the_table_lists_only_its_points(tmp_path: Path, monkeypatch) -> None:
    """A reused --sweep-name folder holds another sweep's points: the table lists this grid's, started or not."""
    submitted = _fake_submission(monkeypatch)
    sweep_dir, cfgs = expand("mnist_distarc", [f"run_root={tmp_path}"], ["seed=0,1"], "grid")
    _point(sweep_dir, "lr=0.1", max_steps=300, step=300)  # left by another sweep
    assert launcher.run_sweep(sweep_dir, cfgs, use_slurm=True, no_wait=True) == 0
    assert [name for _, name in submitted] == ["seed=0", "seed=1"]
    with open(os.path.join(sweep_dir, MANIFEST_FILE)) as f:
        assert json.load(f) == {"points": ["seed=0", "seed=1"], "hparams": ["seed"]}
    table = (Path(sweep_dir) / SUMMARY_FILE).read_text().splitlines()  # written before anything ran
    assert table[2:] == ["| seed=0 |  | not started |  |", "| seed=1 |  | not started |  |"]
    _point(sweep_dir, "seed=1", max_steps=300, step=300)
    assert [line.split(" | ")[:3] for line in write_summary(sweep_dir).splitlines()[2:]] == [
        ["| seed=0", "", "not started"],
        ["| seed=1", "300", "finished"],
    ]


def test_a_resubmitted_subset_keeps_the_other_points(tmp_path: Path, monkeypatch) -> None:
    """Resubmitting one point of a sweep (e.g. the one that failed) under its --sweep-name added it to the
    record; it had replaced it, and the table and HPARAMS experiment lost every other point."""
    submitted = _fake_submission(monkeypatch)
    sweep_dir, cfgs = expand("mnist_distarc", [f"run_root={tmp_path}"], ["seed=0,1,2"], "grid")
    assert launcher.run_sweep(sweep_dir, cfgs, use_slurm=True, no_wait=True) == 0
    _, again = expand("mnist_distarc", [f"run_root={tmp_path}"], ["seed=1"], "grid")
    assert again[0].run_dir == cfgs[1].run_dir  # the same point, resumed in its folder
    assert launcher.run_sweep(sweep_dir, again, use_slurm=True, no_wait=True) == 0
    assert [name for _, name in submitted] == ["seed=0", "seed=1", "seed=2", "seed=1"]
    with open(os.path.join(sweep_dir, MANIFEST_FILE)) as f:
        assert json.load(f) == {"points": ["seed=0", "seed=1", "seed=2"], "hparams": ["seed"]}


@pytest.mark.parametrize(("seeds", "submitted_as"), [("0,1", "job array 7;"), ("0", "job 7;")])
def test_a_sweep_submitted_without_waiting_says_how_to_get_its_table(
    tmp_path: Path, monkeypatch, capsys, seeds: str, submitted_as: str
) -> None:
    """A sweep of one point is a plain job, not an array (submitit submits a batch of one so); --no-wait
    returned without saying how to see the table once the points have run."""
    _fake_submission(monkeypatch, array=seeds != "0")
    sweep_dir, cfgs = expand("mnist_distarc", [f"run_root={tmp_path}"], [f"seed={seeds}"], "grid")
    assert launcher.run_sweep(sweep_dir, cfgs, use_slurm=True, no_wait=True) == 0
    out = capsys.readouterr().out
    assert f"submitted {submitted_as}" in out
    assert f"table later: python -m launch.sweep {sweep_dir}" in out


def test_a_job_sbatch_refuses_is_an_error_not_a_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    """sbatch refusing the job (a constraint or memory the cluster lacks) raised submitit's FailedJobError as a
    traceback, and a sweep had already recorded points that were never queued."""
    from submitit.core.utils import FailedJobError

    _fake_submission(monkeypatch)

    class Refusing:
        @contextlib.contextmanager
        def batch(self) -> Iterator[None]:
            yield
            raise FailedJobError("sbatch: error: Memory specification can not be satisfied")

        def submit(self, job: Any) -> None:
            raise FailedJobError("sbatch: error: Memory specification can not be satisfied")

    monkeypatch.setattr(launcher, "make_executor", lambda slurm, folder, use_slurm: Refusing())
    base = ["--slurm", "--no-wait", f"run_root={tmp_path}", "slurm.mem_gb=100000"]
    assert launcher.main(base) == 2
    err = capsys.readouterr().err
    assert "error: sbatch refused the job: sbatch: error: Memory specification" in err and "slurm.mem_gb" in err
    assert launcher.main([*base, "--sweep", "seed=0,1", "--sweep-name", "grid"]) == 2
    assert "sbatch refused the job" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "mnist_distarc-sweep-grid" / MANIFEST_FILE)


def test_summary_table_tells_finished_from_stopped_points(tmp_path: Path) -> None:
    """A point stopped by a signal writes summary.json at the step it saved: it read like a finished one."""
    _point(str(tmp_path), "seed=0", max_steps=10, step=10, acc=0.9)
    _point(str(tmp_path), "seed=1", max_steps=300, step=53, acc=0.4, stop_signal="SIGTERM")
    _point(str(tmp_path), "seed=2", max_steps=300, step=120, acc=0.6)  # run(stop_at_step=120)
    _point(str(tmp_path), "seed=3", max_steps=300, step=None)  # started, no summary yet
    os.makedirs(tmp_path / "submitit")  # not a point
    lines = summary_table(summary_rows(str(tmp_path))).splitlines()  # no sweep.json: every point folder
    assert lines[0] == "| point | step | status | last_train_loss | acc_measure | poincare/R@1 |"
    assert lines[2:] == [
        "| seed=0 | 10 | finished | 1.5000 | 0.9000 | 0.4500 |",
        "| seed=1 | 53 | stopped at step 53 of 300 by SIGTERM | 1.5000 | 0.4000 | 0.2000 |",
        "| seed=2 | 120 | stopped at step 120 of 300 | 1.5000 | 0.6000 | 0.3000 |",
        "| seed=3 |  | not finished |  |  |  |",
    ]


def _point(
    sweep_dir: str, name: str, max_steps: int, step: int | None, acc: float = 0.5, stop_signal: str = ""
) -> None:
    """A point folder as training leaves it: config.yaml at start, summary.json when it stops (step not None)."""
    point = os.path.join(sweep_dir, name)
    os.makedirs(point, exist_ok=True)  # the launcher may have recorded the queued job in it
    save_yaml(
        apply_overrides(get_recipe("mnist_distarc"), [f"max_steps={max_steps}"]), os.path.join(point, "config.yaml")
    )
    if step is None:
        return
    RunSummary(
        run_dir=point,
        tensorboard_dir="",
        checkpoint=None,
        step=step,
        resumed_from_step=0,
        last_train_loss=1.5,
        stop_signal=stop_signal,
        world_size=2,
        started_at=0.0,
        first_step_at=0.0,
        train_seconds=1.0,
        total_seconds=1.0,
        metrics={"acc_measure": acc, "poincare/R@1": acc / 2},
    ).write(os.path.join(point, "summary.json"))


def _fake_submission(monkeypatch, array: bool = True) -> list[tuple[str, str]]:
    """Replace the cluster: (slurm.partition the array was submitted with, point) per submitted task. Job ids
    as submitit gives them: "7_<task>" in an array, "7" for a batch of one (submitted as a plain job)."""
    submitted: list[tuple[str, str]] = []

    class Job:
        def __init__(self, index: int) -> None:
            self.job_id = f"7_{index}" if array else "7"

    class Executor:
        def __init__(self, slurm: SlurmConfig) -> None:
            self.slurm = slurm

        @contextlib.contextmanager
        def batch(self) -> Iterator[None]:
            yield

        def submit(self, job: Any) -> Job:
            cfg: RunConfig = job.cfg
            submitted.append((self.slurm.partition, cfg.name))
            return Job(len(submitted) - 1)

    monkeypatch.setattr(launcher, "make_executor", lambda slurm, folder, use_slurm: Executor(slurm))
    monkeypatch.setattr(
        launcher, "preflight", lambda cfgs, use_slurm, sweep=False: None
    )  # sinfo, run dirs: no cluster here
    monkeypatch.setattr(launcher, "ensure_prepared", lambda data: None)
    return submitted


def test_a_sweep_folder_named_by_the_old_rule_is_pointed_out(tmp_path: Path, capsys) -> None:
    (tmp_path / "mnist_distarc-sweep").mkdir()  # the default before the grid digest (no training overrides)
    sweep_dir, _ = expand("mnist_distarc", [f"run_root={tmp_path}"], ["optim.lr=1e-3,3e-3"])
    assert os.path.basename(sweep_dir) != "mnist_distarc-sweep"
    assert "--sweep-name mnist_distarc-sweep" in capsys.readouterr().err
    # name=... sweeps: their digest now holds the recipe; the folder of the rule before is pointed out
    renamed = [f"run_root={tmp_path}", "name=study"]
    before = default_sweep_name("study", renamed, ["seed=0,1"])
    (tmp_path / before).mkdir()
    assert os.path.basename(expand("mnist_distarc", renamed, ["seed=0,1"])[0]) != before
    assert f"--sweep-name {before}" in capsys.readouterr().err
    own = [f"run_root={tmp_path}"]  # a recipe's own name: the same folder as by the rule before
    assert os.path.basename(expand("mnist_distarc", own, ["seed=0,1"])[0]) == default_sweep_name(
        "mnist_distarc", own, ["seed=0,1"]
    )
    assert "renamed recipe" not in capsys.readouterr().err


def test_the_sweep_writes_one_hparams_experiment_over_its_points_and_theirs_are_sessions(tmp_path: Path) -> None:
    """TensorBoard shows one HPARAMS experiment per logdir and takes the first it finds: a sweep over recipes had
    a DistArc point's (no loss.chest.*, no Poincare scores) for all. The points now log sessions only, with the
    swept settings (model.drop_path_rate was missing: points looked identical); the sweep writes the union."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from train.tensorboard_logger import TensorBoardLogger, run_hparams

    sweep_dir, cfgs = expand(
        "mnist_distarc", [f"run_root={tmp_path}"], ["recipe=mnist_distarc,mnist_chest", "model.drop_path_rate=0,0.2"]
    )
    launcher_keys = varying_keys(cfgs)
    assert "model.drop_path_rate" in launcher_keys and "loss.name" in launcher_keys and "name" not in launcher_keys
    write_summary(sweep_dir, [c.name for c in cfgs], launcher_keys)
    assert not os.path.exists(os.path.join(sweep_dir, "hparams"))  # nothing finished yet
    for cfg, acc in zip(cfgs, (0.5, 0.6, 0.7, 0.8)):
        os.makedirs(cfg.run_dir)
        save_yaml(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        hparams = run_hparams(cfg.to_dict(), cfg.run_root)
        assert hparams["model.drop_path_rate"] == cfg.model.drop_path_rate
        metrics = {"acc_measure": acc} if cfg.loss.name == "distarc" else {"acc_poincare": acc}
        logger = TensorBoardLogger(cfg.run_dir, True)
        logger.log_hparams(hparams, metrics, step=cfg.max_steps)
        logger.close()
        tags = EventAccumulator(logger.tb_dir).Reload().PluginTagToContent("hparams")
        assert sorted(tags) == ["_hparams_/session_end_info", "_hparams_/session_start_info"]
        RunSummary(
            run_dir=cfg.run_dir,
            tensorboard_dir="",
            checkpoint=None,
            step=cfg.max_steps,
            resumed_from_step=0,
            last_train_loss=1.0,
            stop_signal="",
            world_size=2,
            started_at=0.0,
            first_step_at=0.0,
            train_seconds=1.0,
            total_seconds=1.0,
            metrics=metrics,
        ).write(os.path.join(cfg.run_dir, "summary.json"))
    write_summary(sweep_dir)
    content = EventAccumulator(os.path.join(sweep_dir, "hparams")).Reload().PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    names = {h.name for h in experiment.hparam_infos}
    assert {"model.drop_path_rate", "loss.chest.curvature", "loss.radial_weight", "global_batch"} <= names
    loss_name = next(h for h in experiment.hparam_infos if h.name == "loss.name")
    assert sorted(v.string_value for v in loss_name.domain_discrete.values) == ["chest", "distarc"]
    assert sorted(m.name.tag for m in experiment.metric_infos) == [
        "hparams/acc_measure",
        "hparams/acc_poincare",
        "hparams/last_train_loss",
    ]
