"""Checkpoints written before 2026-12-06 still resume: their backbone optimizer state was saved with 1-D-only
weight-decay groups (no "decay_groups" in meta.json), so a ViT's pos_embed and cls_token are put back in
the decay group; and their RNG files hold one stream for every rank (no "rank_streams"), so the per-rank
seed is kept instead of restoring them."""

from __future__ import annotations

import json
import os

import torch

from launch.__main__ import build_config
from tests.test_train import small_overrides

VIT = ["model.name=vit_tiny_patch16_224", "model.img_size=28", "model.patch_size=7", "data.num_workers=0"]


def _train_as_before(overrides: list[str]) -> None:
    """Two steps and a save, with the backbone grouped as the old code grouped it."""
    import train.main as main

    built = main.build_engine
    main.build_engine = lambda *a, **k: built(*a, **{**k, "decay_groups": "ndim"})  # type: ignore[assignment]
    try:
        main.run(build_config("mnist_distarc_vit", overrides), stop_at_step=2)
    finally:
        main.build_engine = built  # type: ignore[assignment]


def _resume(overrides: list[str]) -> dict:
    from train.checkpoint import find_latest
    from train.dist import env_from_environ
    from train.main import build_model

    cfg = build_config("mnist_distarc_vit", overrides)
    trainer, state = build_model(cfg, env_from_environ(), torch.device("cpu"), find_latest(cfg.run_dir))
    zero = trainer.engine.optimizer  # ZeRO-2: its groups hold flat partitions, bit16_groups the module's tensors
    decays = [g["weight_decay"] for g in zero.optimizer.param_groups]
    decayed = {id(p) for params, wd in zip(zero.bit16_groups, decays) if wd > 0 for p in params}
    trunk = trainer.engine.module.trunk
    return {"groups": state.decay_groups, "pos_embed_decayed": id(trunk.pos_embed) in decayed, "draw": torch.rand(3)}


def test_a_checkpoint_from_before_the_groups_and_rank_streams_resumes(dist_pool, mnist_root, tmp_path) -> None:
    args = small_overrides(mnist_root, str(tmp_path), "old", 6) + VIT
    pool = dist_pool(2)
    pool.run(_train_as_before, args)
    step = tmp_path / "old" / "checkpoints" / "step-2"
    meta = json.loads((step / "meta.json").read_text())
    del meta["decay_groups"], meta["rank_streams"]  # as the old code wrote it
    (step / "meta.json").write_text(json.dumps(meta))
    rng = step / "rng"
    os.replace(rng / "rank-0-of-2.pt", rng / "rank-1-of-2.pt")  # one stream for all: rank 0's file twice
    torch.save(torch.load(rng / "rank-1-of-2.pt", weights_only=False), rng / "rank-0-of-2.pt")
    resumed = pool.run(_resume, args)
    assert [(r["groups"], r["pos_embed_decayed"]) for r in resumed] == [("ndim", True)] * 2  # the old groups
    assert not torch.equal(resumed[0]["draw"], resumed[1]["draw"])  # not the one shared stream
    fresh = dist_pool(1).run(_resume, [*args[:1], *args[1:], "name=fresh"])[0]
    assert fresh["groups"] == "timm" and not fresh["pos_embed_decayed"]
