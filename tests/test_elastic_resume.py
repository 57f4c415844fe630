"""Resume at another world size: a checkpoint written by 4 ranks resumed by 2 (and 2 -> 4) holds the
same head table, and the first step's loss on a fixed global batch matches continuing at the old
size within 1e-5 (fp32, CPU); a run then trains on from there. The engine goes through DeepSpeed's
universal checkpoint (train/elastic.py), the head is re-sliced by class range."""

from __future__ import annotations

import math
import os

import pytest
import torch

from launch.__main__ import build_config
from tests.test_train import small_overrides
from train.checkpoint import find_latest

FIXED_BATCH = 32  # global; split contiguously over the ranks, so every world size sees the same rows


def _train(overrides: list[str], stop_at_step: int | None) -> dict:
    from train.main import run

    return run(build_config("mnist_distarc", overrides), stop_at_step=stop_at_step).to_json()


def _resume_and_measure(overrides: list[str]) -> dict:
    """Resume the run's latest checkpoint at this pool's world size; return the loss of one fixed
    global batch (eval mode: BatchNorm uses the restored statistics; no update) and the whole table."""
    from data.stream import build_eval_loader
    from train.dist import all_gather_variable, env_from_environ
    from train.main import build_model

    cfg = build_config("mnist_distarc", overrides)
    env = env_from_environ()
    trainer, state = build_model(cfg, env, torch.device("cpu"), find_latest(cfg.run_dir))
    images, labels = next(iter(build_eval_loader(cfg.data, 0, 1)))
    per_rank = FIXED_BATCH // env.world_size
    rows = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
    trainer.engine.eval()
    with torch.no_grad():
        loss = float(trainer.task(trainer.model_input(images[rows]), labels[rows], step=state.step)["loss"])
    table = next(iter(trainer.task.head.sharded_parameters().values())).detach()
    return {
        "step": state.step,
        "loss": loss,
        "table": all_gather_variable(table),
        "lr": trainer.engine.optimizer.param_groups[0]["lr"],
        "head_lr": trainer.head_optimizer.param_groups[0]["lr"],
    }


@pytest.mark.parametrize("old, new, stage", [(4, 2, 2), (2, 4, 2), (2, 1, 0)])
def test_resume_at_another_world_size(dist_pool, mnist_root: str, tmp_path, old: int, new: int, stage: int) -> None:
    # ZeRO-0 (fp32) holds the whole optimizer state in one file: it loads as it is (the converter failed on it)
    args = small_overrides(mnist_root, str(tmp_path), f"w{old}", 14) + ["data.num_workers=0", f"zero.stage={stage}"]
    dist_pool(old).run(_train, args, 10)  # a job at the old size, stopped after its step-10 save
    same = dist_pool(old).run(_resume_and_measure, args)
    other = dist_pool(new).run(_resume_and_measure, args)
    assert same[0]["step"] == other[0]["step"] == 10
    assert os.path.isdir(tmp_path / f"w{old}" / "checkpoints" / "step-10" / "engine_universal") == (stage > 0)
    assert torch.equal(same[0]["table"], other[0]["table"]) and same[0]["table"].shape[0] == 10
    assert other[0]["lr"] == same[0]["lr"]  # the schedule's position came back too
    assert abs(other[0]["loss"] - same[0]["loss"]) <= 1e-5, (same[0]["loss"], other[0]["loss"])
    assert len({round(r["loss"], 6) for r in other}) == 1  # a global loss: every rank agrees
    summary = dist_pool(new).run(_train, args, None)[0]  # and training goes on at the new size
    assert summary["resumed_from_step"] == 10 and summary["step"] == 14 and summary["world_size"] == new
    assert math.isfinite(summary["last_train_loss"])


def test_the_stream_resumes_at_the_samples_read_whatever_the_world_size() -> None:
    from train.checkpoint import TrainState
    from train.dist import DistEnv
    from train.main import stream_start

    cfg = build_config("mnist_distarc", ["data.root=unused"])  # 64 images per rank and micro-batch
    state = TrainState(step=20, samples_seen=20 * 64 * 2)  # a 2-rank run stopped at step 20
    starts = {world: stream_start(state, cfg, DistEnv(0, world, 0, world)) for world in (1, 2, 4)}
    # the same position in the epoch (2560 samples) at every size; step x 1 skipped ahead 2x on 4 ranks
    assert starts == {1: 40, 2: 20, 4: 10}


def test_a_resume_that_switches_bf16_goes_through_the_universal_checkpoint(
    dist_pool, mnist_root: str, tmp_path
) -> None:
    """DeepSpeed's plain load looks for the optimizer files of the new precision (FileNotFoundError
    `bf16_zero_pp_rank_0_...optim_states.pt`): fp32 ZeRO-2 resumed in bf16 is converted, same table, trains on."""
    args = small_overrides(mnist_root, str(tmp_path), "bf16", 12) + ["data.num_workers=0", "zero.stage=2"]
    dist_pool(1).run(_train, args, 10)
    fp32 = dist_pool(1).run(_resume_and_measure, args)[0]
    bf16 = dist_pool(1).run(_resume_and_measure, args + ["zero.bf16=true"])[0]
    assert bf16["step"] == 10 and torch.equal(bf16["table"], fp32["table"]) and bf16["lr"] == fp32["lr"]
    assert os.path.isdir(tmp_path / "bf16" / "checkpoints" / "step-10" / "engine_universal")
    # DeepSpeed wrote its output folder's name (our temp folder) here; a tag-less load reads it
    assert (tmp_path / "bf16" / "checkpoints" / "step-10" / "latest_universal").read_text() == "engine_universal"
    assert not list((tmp_path / "bf16" / "checkpoints" / "step-10").glob(".tmp-*"))
    summary = dist_pool(1).run(_train, args + ["zero.bf16=true"], None)[0]
    assert summary["resumed_from_step"] == 10 and summary["step"] == 12 and math.isfinite(summary["last_train_loss"])


@pytest.mark.parametrize(
    "saved, now, refused",
    [
        ((2, False), (3, False), "written at zero.stage=2 but the config asks for zero.stage=3.*set zero.stage=2"),
        ((3, False), (2, False), "written at zero.stage=3 but the config asks for zero.stage=2"),
        ((0, False), (1, False), "written at zero.stage=0"),
        ((1, False), (2, False), ""),  # stages 1 and 2 write the same files
        ((2, True), (2, False), ""),  # converted (above)
    ],
)
def test_engine_changes_no_conversion_bridges_are_refused_before_anything_is_built(
    tmp_path, saved: tuple[int, bool], now: tuple[int, bool], refused: str
) -> None:
    """DeepSpeed failed such a resume only once the engine was built, with a bare AssertionError."""
    from train.checkpoint import check_resumable
    from train.config import save_yaml

    cfg = build_config("mnist_distarc", [f"zero.stage={saved[0]}", f"zero.bf16={str(saved[1]).lower()}"])
    save_yaml(cfg, str(tmp_path / "config.yaml"))
    cfg = build_config("mnist_distarc", [f"zero.stage={now[0]}", f"zero.bf16={str(now[1]).lower()}"])
    if refused:
        with pytest.raises(ValueError, match=refused):
            check_resumable(str(tmp_path), cfg)
    else:
        check_resumable(str(tmp_path), cfg)


def test_a_longer_schedule_on_resume_moves_backbone_and_head_together(dist_pool, mnist_root: str, tmp_path) -> None:
    """max_steps 10 -> 40 at step 6: both rates are their base rate x the new schedule's factor at step 6 (the
    backbone kept the old schedule's rate for one step: 0.04268 against the head's 0.04849 in the review)."""
    from train.schedule import lr_factor

    args = small_overrides(mnist_root, str(tmp_path), "longer", 10) + ["data.num_workers=0", "zero.stage=2"]
    dist_pool(1).run(_train, args, 6)  # saved at step 6, past the 5 warm-up steps
    longer = [a if not a.startswith("max_steps=") else "max_steps=40" for a in args]
    (resumed,) = dist_pool(1).run(_resume_and_measure, longer)
    cfg = build_config("mnist_distarc", longer)
    factor = lr_factor(6, cfg.optim.warmup_steps, 40, cfg.optim.min_lr_ratio)
    assert factor != pytest.approx(lr_factor(6, cfg.optim.warmup_steps, 10, cfg.optim.min_lr_ratio))
    assert resumed["step"] == 6
    assert resumed["lr"] == pytest.approx(cfg.optim.lr * factor, rel=1e-9)
    assert resumed["head_lr"] == pytest.approx(cfg.optim.head_lr * factor, rel=1e-9)
