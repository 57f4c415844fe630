"""Sharded CHEST and SoftTriple == a dense single-process reference, in 1, 2 and 4 gloo processes.

The reference is independent of model.chest: hyperbolic maths from geoopt (PoincareBall, k = -c),
Euclidean distances from torch.cdist, soft-min weights and the margin softmax from the formulas,
torch's cross_entropy. HypHC uses the same fixed triplets (`sample_triplets` is a pure function of
the world size, seed and step), so the rotating-peer exchange must return exactly those negatives. Triplets
are drawn in blocks of 3 anchors here (model.hyphc.TRIPLET_BLOCK), so shards start inside blocks and span several.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import geoopt
import pytest
import torch
import torch.nn.functional as F

from model import hyphc
from model.chest import ChestHead, chest_loss, sample_triplets
from model.config import ChestConfig, LossConfig
from model.proxies import class_permutation, init_rows
from tests.numerics import assert_rel

GLOBAL_BATCH, DIM_E, DIM_H, K = 8, 6, 5, 3
BASE = LossConfig(
    name="chest",
    init_seed=11,
    chest=ChestConfig(
        proxies_per_class=K,
        hyp_dim=DIM_H,
        curvature=0.5,
        clip_radius=2.3,
        gamma_e=5.0,
        gamma_h=5.0,
        lambda_e=20.0,
        lambda_h=20.0,
        delta_e=1.0,
        delta_h=0.5,
        eta_e=1.0,
        eta_h=1.0,
        tau=0.5,
        proxy_init_std=1.0,
    ),
)
CASES = {
    "chest": BASE,
    "chest_signneg_detach": dataclasses.replace(
        BASE, chest=dataclasses.replace(BASE.chest, hyphc_sign=-1, hyphc_detach_sim=True, permute_classes=False)
    ),
    "chest_local_negatives": dataclasses.replace(BASE, chest=dataclasses.replace(BASE.chest, hyphc_negatives="local")),
    "hyperbolic_only": dataclasses.replace(BASE, chest=dataclasses.replace(BASE.chest, eta_e=0.0)),
    "euclid_on_head": dataclasses.replace(
        BASE, chest=dataclasses.replace(BASE.chest, eta_h=0.0, tau=0.0, euclid_features="head")
    ),
    "softtriple": LossConfig(
        name="softtriple",
        init_seed=5,
        chest=ChestConfig(proxies_per_class=K, gamma_e=0.1, lambda_e=20.0, delta_e=0.01, tau=0.2),
    ),
}
STEP = 3


@contextlib.contextmanager
def small_triplet_blocks(block: int = 3) -> Iterator[None]:
    """Triplets drawn `block` anchors at a time (the default block holds every class of these tests)."""
    saved, hyphc.TRIPLET_BLOCK = hyphc.TRIPLET_BLOCK, block
    try:
        yield
    finally:
        hyphc.TRIPLET_BLOCK = saved


def make_problem(num_classes: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + micro)
    return torch.randn(GLOBAL_BATCH, DIM_E, generator=g) * 2.0, torch.randint(
        0, num_classes, (GLOBAL_BATCH,), generator=g
    )


def reference(
    cfg: LossConfig, x: torch.Tensor, labels: torch.Tensor, table: torch.Tensor, fc: torch.nn.Linear | None, world: int
) -> torch.Tensor:
    ch = cfg.chest
    num_classes = table.shape[0]
    perm = class_permutation(num_classes, cfg.init_seed) if ch.permute_classes else torch.arange(num_classes)
    y = perm[labels]
    flat = table.reshape(num_classes * K, DIM_E)

    def margin_ce(sim: torch.Tensor, lam: float, delta: float) -> torch.Tensor:
        return F.cross_entropy(lam * (sim - delta * F.one_hot(y, num_classes)), y)

    if cfg.name == "softtriple":
        sims = (F.normalize(x, dim=1) @ F.normalize(flat, dim=1).t()).view(-1, num_classes, K)
        sim = (torch.softmax(sims / ch.gamma_e, dim=2) * sims).sum(2)
        w = F.normalize(table, dim=2)
        reg = sum(
            torch.sqrt(2 + 1e-5 - 2 * (w[c, a] * w[c, b]).sum())
            for c in range(num_classes)
            for a in range(K)
            for b in range(a + 1, K)
        )
        return margin_ce(sim, ch.lambda_e, ch.delta_e) + ch.tau * reg / (num_classes * K * (K - 1))

    def softmin(d: torch.Tensor, gamma: float) -> torch.Tensor:
        return -(torch.softmax(-d / gamma, dim=2) * d).sum(2)

    ball = geoopt.PoincareBall(c=ch.curvature)

    def to_ball(v: torch.Tensor) -> torch.Tensor:
        norm = v.norm(dim=1, keepdim=True)
        return ball.expmap0(v * torch.clamp(ch.clip_radius / (norm + 1e-5), max=1.0))

    loss = torch.zeros(())
    if ch.eta_e > 0:
        fx, fp = (fc(x), fc(flat)) if ch.euclid_features == "head" else (x, flat)
        d_e = torch.cdist(fx, fp).view(-1, num_classes, K)
        loss = loss + ch.eta_e * margin_ce(softmin(d_e, ch.gamma_e), ch.lambda_e, ch.delta_e)
    p_h = to_ball(fc(flat)).view(num_classes, K, DIM_H)
    if ch.eta_h > 0:
        x_h = to_ball(fc(x))
        d_h = ball.dist(x_h[:, None, :], p_h.view(1, -1, DIM_H)).view(-1, num_classes, K)
        loss = loss + ch.eta_h * margin_ce(softmin(d_h, ch.gamma_h), ch.lambda_h, ch.delta_h)
    if ch.tau > 0:
        t = sample_triplets(num_classes, K, world, cfg.init_seed, STEP, ch.hyphc_negatives)
        total = torch.zeros(())
        for c in range(num_classes):
            if not t.valid[c]:
                continue
            a, b, n = p_h[c, t.pos_i[c]], p_h[c, t.pos_j[c]], p_h[t.neg_class[c], t.neg_k[c]]
            d = torch.stack([ball.dist(a, b), ball.dist(a, n), ball.dist(b, n)])
            s = torch.exp(-d).detach() if ch.hyphc_detach_sim else torch.exp(-d)
            total = total + (s * (1 - torch.softmax(ch.hyphc_sign * d / ch.gamma_hyp, dim=0))).sum()
        loss = loss + ch.tau / num_classes * total
    return loss


@small_triplet_blocks()
def sharded_rank(cfg: LossConfig, num_classes: int, accum: int) -> dict:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    b = GLOBAL_BATCH // world
    head = ChestHead(cfg, num_classes, DIM_E, rank, world)
    embs, losses = [], []
    for micro in range(accum):
        x, labels = make_problem(num_classes, micro)
        emb = x[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        out = head(emb, labels[rank * b : (rank + 1) * b], step=STEP)
        (out["loss"] / accum).backward()
        embs.append(emb.grad)
        losses.append(float(out["loss"].detach()))
    repl = {k: p.grad.clone() for k, p in head.replicated_parameters().items()}
    pred = head.predict(make_problem(num_classes, 0)[0])
    return {
        "losses": losses,
        "emb_grads": embs,
        "proxies": head.proxies.detach().clone(),
        "proxy_grad": head.proxies.grad.clone(),
        "replicated": repl,
        "pred": pred,
    }


@small_triplet_blocks()
def dense_ours(
    cfg: LossConfig, num_classes: int, world: int, accum: int, dtype: torch.dtype, independent: bool
) -> dict:
    """Whole-table loss and grads in this process: model.chest.chest_loss (fp32) or the fp64 reference."""
    table = (init_rows(cfg.init_seed, 0, num_classes, (K, DIM_E)) * cfg.chest.proxy_init_std).to(dtype)
    table.requires_grad_(True)
    fc = ChestHead(cfg, num_classes, DIM_E).fc  # same deterministic init as every rank's
    fc = fc.to(dtype) if fc is not None else None
    perm = class_permutation(num_classes, cfg.init_seed) if cfg.chest.permute_classes else torch.arange(num_classes)
    trip = sample_triplets(num_classes, K, world, cfg.init_seed, STEP, cfg.chest.hyphc_negatives)
    losses, emb_grads = [], []
    for micro in range(accum):
        x, labels = make_problem(num_classes, micro)
        x = x.to(dtype).requires_grad_(True)
        if independent:
            loss = reference(cfg, x, labels, table, fc, world)
        else:
            loss = chest_loss(x, perm[labels], table, cfg, fc, trip)
        (loss / accum).backward()
        losses.append(float(loss.detach()))
        emb_grads.append(x.grad)
    repl = {} if fc is None else {"fc.weight": fc.weight.grad, "fc.bias": fc.bias.grad}
    return {"losses": losses, "emb_grads": emb_grads, "proxy_grad": table.grad, "replicated": repl}


def compare(got: dict, want: dict, msg: str, tol: float) -> None:
    assert got["losses"] == pytest.approx(want["losses"], rel=tol), msg
    for micro, grad in enumerate(want["emb_grads"]):
        assert_rel(got["emb_grads"][micro], grad, f"{msg}: embedding grads", tol)
    assert_rel(got["proxy_grad"], want["proxy_grad"], f"{msg}: proxy grads", tol)
    if want["replicated"]:  # one vector: fc.bias alone is analytically 0 when both sides go through h
        flat = [torch.cat([d["replicated"][k].flatten() for k in sorted(want["replicated"])]) for d in (got, want)]
        assert_rel(flat[0], flat[1], f"{msg}: shared FC h", tol)


@pytest.mark.parametrize("class_chunk", [0, 2])  # 2: each class softmax over chunks of 2 classes (chunked_softmax)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_chest_equals_dense(dist_pool, world: int, class_chunk: int) -> None:
    """Sharded (W ranks) == the same maths on the whole table in one process, to 1e-5 relative."""
    pool = dist_pool(world)
    accum = 2
    for num_classes in (7, 3):  # 3 < 4: one rank holds no class
        for name, cfg in CASES.items():
            results = pool.run(sharded_rank, dataclasses.replace(cfg, class_chunk=class_chunk), num_classes, accum)
            table = init_rows(cfg.init_seed, 0, num_classes, (K, DIM_E)) * cfg.chest.proxy_init_std
            assert torch.equal(torch.cat([r["proxies"] for r in results]), table)  # init independent of W
            sharded = {
                "losses": results[0]["losses"],
                "emb_grads": [torch.cat([r["emb_grads"][m] for r in results]) for m in range(accum)],
                "proxy_grad": torch.cat([r["proxy_grad"] for r in results]),
                "replicated": {k: sum(r["replicated"][k] for r in results) for k in results[0]["replicated"]},
            }
            for r in results:
                assert r["losses"] == pytest.approx(sharded["losses"], rel=1e-6)  # same value on every rank
            msg = f"{name} C={num_classes} W={world}"
            compare(sharded, dense_ours(cfg, num_classes, world, accum, torch.float32, False), msg, 1e-5)
            for r in results[1:]:
                for key in r["pred"]:
                    assert torch.equal(r["pred"][key], results[0]["pred"][key]), msg


@pytest.mark.parametrize("name", sorted(CASES))
def test_dense_chest_equals_independent_fp64_reference(name: str) -> None:
    """Our fp32 maths vs geoopt/cdist/cross_entropy in fp64. Near the clipped ball's edge artanh
    amplifies fp32 rounding about 100x, hence 1e-4 (norm-wise relative) rather than 1e-5."""
    for world in (1, 2, 4):  # the triplets depend on the world size
        for num_classes in (7, 3):
            cfg = CASES[name]
            ours = dense_ours(cfg, num_classes, world, 2, torch.float32, False)
            ref = dense_ours(cfg, num_classes, world, 2, torch.float64, True)
            compare(ours, ref, f"{name} C={num_classes} W={world}", 1e-4)


def test_public_chest_loss_matches_the_head_in_one_process() -> None:
    for name, cfg in CASES.items():
        cfg = dataclasses.replace(cfg, chest=dataclasses.replace(cfg.chest, permute_classes=False))
        head = ChestHead(cfg, 7, DIM_E)
        x, labels = make_problem(7, 0)
        trip = sample_triplets(7, K, 1, cfg.init_seed, STEP, cfg.chest.hyphc_negatives)
        ours = chest_loss(x, labels, head.proxies, cfg, head.fc, trip)
        assert float(ours) == pytest.approx(float(head(x, labels, step=STEP)["loss"]), rel=1e-6), name


@pytest.mark.parametrize("block", [3, hyphc.TRIPLET_BLOCK])
def test_triplets_of_any_anchor_range_are_that_slice_of_the_whole_draw(block: int) -> None:
    """A rank draws only its own anchors' triplets (and its peer's), and must get exactly what the whole draw has."""
    with small_triplet_blocks(block):
        for num_classes, world in ((10, 4), (7, 3), (2, 4), (7, 1)):
            for mode in ("peer", "local"):
                whole = sample_triplets(num_classes, K, world, 1, STEP, mode)
                assert whole.anchors == range(num_classes)
                for lo in range(num_classes + 1):
                    for hi in range(lo, num_classes + 1):
                        part = sample_triplets(num_classes, K, world, 1, STEP, mode, range(lo, hi))
                        assert part.anchors == range(lo, hi) and part.offset == whole.offset
                        for field in ("pos_i", "pos_j", "neg_class", "neg_k", "valid"):
                            assert torch.equal(getattr(part, field), getattr(whole, field)[lo:hi]), (lo, hi, field)
    with pytest.raises(ValueError, match="needs one for each"):
        chest_loss(
            torch.zeros(2, DIM_E),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(7, K, DIM_E),
            BASE,
            ChestHead(BASE, 7, DIM_E).fc,
            sample_triplets(7, K, 1, 0, STEP, "local", range(2, 5)),
        )


def test_a_rank_draws_only_the_blocks_its_anchors_fall_in(monkeypatch) -> None:
    """O(C / P) per step: at a million classes and 64 ranks a rank draws 3 blocks of 8192 anchors, not 123."""
    blocks: list[int] = []
    seed = hyphc.stable_seed

    def counted(*parts: object) -> int:
        if "triplets" in parts:
            blocks.append(int(parts[-1]))  # type: ignore[call-overload]
        return seed(*parts)

    monkeypatch.setattr(hyphc, "stable_seed", counted)
    lo, n = 5 * 15_625, 15_625  # rank 5 of 64
    part = sample_triplets(1_000_000, 2, 64, 0, STEP, "peer", range(lo, lo + n))
    assert blocks == [9, 10, 11] and len(part.pos_i) == n  # anchors 78,125 to 93,749: blocks 9 to 11
    blocks.clear()
    sample_triplets(1_000_000, 2, 64, 0, STEP, "peer")
    assert blocks == list(range(-(-1_000_000 // 8192)))
