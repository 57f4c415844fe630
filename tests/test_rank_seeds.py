"""Each rank trains with its own random stream (drop-path and dropout masks differ across ranks) while
the backbone starts identical everywhere; a resume at the same world size continues each rank's own
stream, and one at another world size starts streams unlike a fresh run's (the step joins the seed)."""

from __future__ import annotations

import torch

from launch.__main__ import build_config
from tests.test_train import small_overrides


def _build_and_draw(overrides: list[str]) -> dict:
    from train.checkpoint import find_latest
    from train.dist import env_from_environ
    from train.main import build_model

    cfg = build_config("mnist_distarc", overrides)
    env = env_from_environ()
    resume = find_latest(cfg.run_dir) if cfg.checkpoint.resume else None
    trainer, _ = build_model(cfg, env, torch.device("cpu"), resume)
    first = next(trainer.engine.module.parameters()).detach().clone()
    return {"draw": torch.rand(4), "param": first}


def _train(overrides: list[str], stop_at_step: int) -> None:
    from train.main import run

    run(build_config("mnist_distarc", overrides), stop_at_step=stop_at_step)


def test_ranks_draw_their_own_random_numbers_from_one_initial_model(dist_pool, mnist_root, tmp_path) -> None:
    args = small_overrides(mnist_root, str(tmp_path), "seeds", 8) + ["data.num_workers=0", "checkpoint.resume=false"]
    fresh = dist_pool(2).run(_build_and_draw, args)
    assert torch.equal(fresh[0]["param"], fresh[1]["param"])  # DeepSpeed's broadcast, same init
    assert not torch.equal(fresh[0]["draw"], fresh[1]["draw"])  # each rank its own masks
    again = dist_pool(2).run(_build_and_draw, args)
    assert all(torch.equal(a["draw"], b["draw"]) for a, b in zip(fresh, again))  # reproducible per rank

    resume_args = args[:-1] + ["checkpoint.resume=true"]
    pool = dist_pool(2)
    pool.run(_train, resume_args, 4)  # stopped after its step-4 save, which holds each rank's RNG state
    saved = [
        torch.load(tmp_path / "seeds" / "checkpoints" / "step-4" / "rng" / f"rank-{r}-of-2.pt", weights_only=False)
        for r in (0, 1)
    ]
    resumed = pool.run(_build_and_draw, resume_args)
    for rank in (0, 1):  # the saved state, not a re-seed: the draw equals one from the saved state
        torch.set_rng_state(saved[rank]["torch"])
        assert torch.equal(resumed[rank]["draw"], torch.rand(4))
    other = dist_pool(4).run(_build_and_draw, resume_args)  # another world size: seeded with the step
    draws = [o["draw"] for o in other]
    assert all(not torch.equal(draws[i], draws[j]) for i in range(4) for j in range(i))
    assert not torch.equal(draws[0], fresh[0]["draw"])
