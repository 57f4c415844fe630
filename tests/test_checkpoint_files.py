"""The checkpoint folder's bookkeeping without a training run: which checkpoint a resume picks, what a prune
removes, what resume=false does to an earlier run's checkpoints, what a requeue resubmits, what is fsynced."""

from __future__ import annotations

import json
import os

from train import checkpoint as ckpt


def _complete(root: str, step: int) -> str:
    path = os.path.join(root, f"step-{step}")
    os.makedirs(path)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": step}, f)
    return path


def test_a_complete_checkpoint_past_latest_wins(tmp_path) -> None:
    """A save killed between its rename and the pointer's update left step-6 complete and latest at step-3."""
    root = ckpt.checkpoint_root(str(tmp_path))
    _complete(root, 3)
    ckpt._write_latest(root, "step-3")
    assert ckpt.find_latest(str(tmp_path)) == os.path.join(root, "step-3")
    _complete(root, 6)
    os.makedirs(os.path.join(root, "step-9"))  # incomplete: no meta.json
    assert ckpt.find_latest(str(tmp_path)) == os.path.join(root, "step-6")


def test_every_rank_resumes_from_rank_0s_choice(dist_pool, tmp_path) -> None:
    """Views of the run dir that differ between ranks (here: a folder each, rank 1's a step further; on a
    network file system, cached listings) do not split a resume over two steps."""
    chosen = dist_pool(2).run(_latest_seen_by_each_rank, str(tmp_path))
    assert chosen == [os.path.join(ckpt.checkpoint_root(str(tmp_path / "rank0")), "step-5")] * 2


def _latest_seen_by_each_rank(tmp: str) -> str | None:
    from train.dist import env_from_environ

    env = env_from_environ()
    run_dir = os.path.join(tmp, f"rank{env.rank}")
    _complete(ckpt.checkpoint_root(run_dir), 5 + env.rank)
    return ckpt.agreed_latest(run_dir, env)


def test_prune_keeps_the_new_save_and_removes_killed_saves(tmp_path) -> None:
    """Pruning counts only checkpoints up to the one just saved (a step-30 of an earlier run once deleted
    every new save at once), and removes the .tmp-step-* folders of killed saves."""
    root = ckpt.checkpoint_root(str(tmp_path))
    for step in (10, 20, 30, 40):
        _complete(root, step)
    os.makedirs(os.path.join(root, ".tmp-step-35", "head"))
    ckpt._prune(root, keep_last=2, step=20)
    assert sorted(os.listdir(root)) == ["step-10", "step-20", "step-30", "step-40"]  # the new one and the one before
    ckpt._prune(root, keep_last=1, step=20)
    assert sorted(os.listdir(root)) == ["step-20", "step-30", "step-40"]  # only step-10 was older


def test_resume_false_sets_an_earlier_runs_checkpoints_aside(tmp_path) -> None:
    assert ckpt.set_aside_checkpoints(str(tmp_path)) is None  # nothing to move
    root = ckpt.checkpoint_root(str(tmp_path))
    _complete(root, 30)
    aside = ckpt.set_aside_checkpoints(str(tmp_path))
    assert aside is not None and os.path.basename(aside).startswith("checkpoints.before-")
    assert os.listdir(aside) == ["step-30"] and not os.path.exists(root)
    os.makedirs(os.path.join(tmp_path, "tb", "by_samples"))  # the earlier run's curves and results go aside too
    os.makedirs(os.path.join(tmp_path, "export"))
    os.makedirs(os.path.join(tmp_path, "bad_samples"))
    for name in ("summary.json", "eval_val.json", "config.yaml"):
        (tmp_path / name).write_text("{}")
    _complete(root, 10)
    later = ckpt.set_aside_checkpoints(str(tmp_path))
    assert later is not None and not os.path.exists(os.path.join(tmp_path, "tb"))
    suffix = ".before-" + later.rsplit(".before-", 1)[1]
    assert os.listdir(os.path.join(tmp_path, "tb" + suffix)) == ["by_samples"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(aside), os.path.basename(later), "config.yaml"]
        + [name + suffix for name in ("tb", "export", "bad_samples", "summary.json", "eval_val.json")]
    )
    assert ckpt.find_latest(str(tmp_path)) is None


def test_a_requeued_job_resumes_even_when_submitted_with_resume_false() -> None:
    from launch.recipes import get_recipe
    from slurm.job import TrainJob
    import dataclasses

    cfg = get_recipe("mnist_distarc")
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=False))
    again = TrainJob(cfg).checkpoint().function
    assert isinstance(again, TrainJob) and again.cfg.checkpoint.resume and not cfg.checkpoint.resume


def test_every_file_and_folder_of_a_save_is_fsynced(tmp_path, monkeypatch) -> None:
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    tree = tmp_path / ".tmp-step-5"
    (tree / "head").mkdir(parents=True)
    for name in ("meta.json", "head/classes-0.pt", "engine.pt"):
        (tree / name).write_bytes(b"x")
    ckpt._fsync_tree(str(tree))
    assert set(synced) == {str(tree / "meta.json"), str(tree / "head/classes-0.pt"), str(tree / "engine.pt")} | {
        str(tree / "head"),
        str(tree),
    }


def test_a_job_slurm_restarted_resumes_even_with_resume_false() -> None:
    assert ckpt.wants_resume(True, {}) and not ckpt.wants_resume(False, {})
    assert not ckpt.wants_resume(False, {"SLURM_RESTART_COUNT": "0"})
    assert ckpt.wants_resume(False, {"SLURM_RESTART_COUNT": "2"})  # sbatch requeue reruns resume=false
    assert not ckpt.wants_resume(False, {"TORCHELASTIC_RESTART_COUNT": "0"})
    assert ckpt.wants_resume(False, {"TORCHELASTIC_RESTART_COUNT": "1"})  # torchrun --max-restarts: the same


def test_stray_and_damaged_step_folders_are_passed_over(tmp_path, capsys) -> None:
    """A `step-20.bak` copy made every resume fail (int('20.bak')); a meta.json cut off by a full disk was taken
    for complete and both ranks died on it instead of resuming from the step before."""
    root = ckpt.checkpoint_root(str(tmp_path))
    _complete(root, 10)
    _complete(root, 30)
    os.rename(os.path.join(root, "step-30"), os.path.join(root, "step-20.bak"))
    _complete(root, 40)
    with open(os.path.join(root, "step-40", "meta.json"), "w") as f:
        f.write('{"step": 4')
    ckpt._write_latest(root, "step-40")
    assert ckpt.find_latest(str(tmp_path)) == os.path.join(root, "step-10")
    assert "step-40 is passed over: its meta.json does not read" in capsys.readouterr().err
    ckpt._prune(root, keep_last=1, step=10)  # the stray folder is no step to prune either
    assert sorted(os.listdir(root)) == ["latest", "step-10", "step-20.bak", "step-40"]


def test_a_checkpoint_missing_a_head_shard_is_passed_over(tmp_path, capsys) -> None:
    """A head shard lost after the save (a deleted or unsynced file): every requeue picked that step again and
    failed loading it ("head covers 5 of classes [0, 10)"); the step before it is taken, with a warning."""
    root = ckpt.checkpoint_root(str(tmp_path))
    for step in (10, 20):
        path = _complete(root, step)
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump({"step": step, "num_classes": 10}, f)
        os.makedirs(os.path.join(path, "head"))
        for start, stop in ((0, 5), (5, 10)):
            open(os.path.join(path, "head", f"classes-{start:09d}-{stop:09d}.pt"), "wb").close()
    ckpt._write_latest(root, "step-20")
    assert ckpt.find_latest(str(tmp_path)) == os.path.join(root, "step-20")
    os.remove(os.path.join(root, "step-20", "head", "classes-000000000-000000005.pt"))
    assert ckpt.find_latest(str(tmp_path)) == os.path.join(root, "step-10")
    assert "step-20 is passed over: its head/ lacks classes from 0 on" in capsys.readouterr().err
    # overlapping ranges (load_head takes them) cover the classes: (0, 10) then (3, 5) is complete
    path = _complete(root, 30)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": 30, "num_classes": 10}, f)
    os.makedirs(os.path.join(path, "head"))
    for start, stop in ((0, 10), (3, 5)):
        open(os.path.join(path, "head", f"classes-{start:09d}-{stop:09d}.pt"), "wb").close()
    assert ckpt.find_latest(str(tmp_path)) == path


def test_a_checkpoint_missing_engine_files_or_the_replicated_head_is_passed_over(tmp_path, capsys) -> None:
    """A lost ZeRO partition (one rank's optim states), an engine folder without model states or a CHEST save
    without head/replicated.pt failed every requeue on the same step; the step before it is taken instead."""
    root = ckpt.checkpoint_root(str(tmp_path))
    for step in (10, 20):
        path = _complete(root, step)
        with open(os.path.join(path, "meta.json"), "w") as f:
            json.dump({"step": step, "world_size": 2, "replicated": True}, f)
        os.makedirs(os.path.join(path, "head"))
        open(os.path.join(path, "head", "replicated.pt"), "wb").close()
        os.makedirs(os.path.join(path, "engine"))
        for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"):
            open(os.path.join(path, "engine", name), "wb").close()  # ZeRO-3: a model-states file per rank
        for rank in (0, 1):
            open(os.path.join(path, "engine", f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"), "wb").close()
    ckpt._write_latest(root, "step-20")
    step20 = os.path.join(root, "step-20")
    assert ckpt.find_latest(str(tmp_path)) == step20
    os.remove(os.path.join(step20, "engine", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    assert ckpt.find_latest(str(tmp_path)) == os.path.join(root, "step-10")
    assert "step-20 is passed over: its engine/ lacks the optim states of rank(s) [1] (saved by 2)" in (
        capsys.readouterr().err
    )
    open(os.path.join(step20, "engine", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"), "wb").close()
    os.remove(os.path.join(step20, "engine", "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    assert ckpt.find_latest(str(tmp_path)) == os.path.join(root, "step-10")
    assert "lacks the model states of rank(s) [0]" in capsys.readouterr().err
    os.remove(os.path.join(step20, "engine", "zero_pp_rank_1_mp_rank_00_model_states.pt"))
    open(os.path.join(step20, "engine", "mp_rank_00_model_states.pt"), "wb").close()  # the ZeRO-1/2 layout
    assert ckpt.find_latest(str(tmp_path)) == step20
    os.remove(os.path.join(step20, "engine", "mp_rank_00_model_states.pt"))
    assert ckpt.find_latest(str(tmp_path)) == os.path.join(root, "step-10")
    assert "its engine/ holds no model states" in capsys.readouterr().err
    open(os.path.join(step20, "engine", "mp_rank_00_model_states.pt"), "wb").close()
    os.remove(os.path.join(step20, "head", "replicated.pt"))
    assert ckpt.find_latest(str(tmp_path)) == os.path.join(root, "step-10")
    assert "its head/replicated.pt is missing" in capsys.readouterr().err
