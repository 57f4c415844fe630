"""Partial-FC (loss.sample_rate < 1) for CHEST / SoftTriple: the head over the sampled classes == a dense
reference restricted to them, in 1, 2 and 4 processes.

The reference is test_chest_sharded's independent one (geoopt, cdist, cross_entropy; fp64) run on the
table restricted to the union of the ranks' sampled classes, plus the regulariser over the *whole* table
(HypHC with the same fixed triplets, or SoftTriple's centre term), written here from the spec: the
regulariser sees every proxy whatever the sample rate. Each rank's sampled set depends on its class
range, so it differs between world sizes; the reference is rebuilt from each run's own union.
"""

from __future__ import annotations

import dataclasses

import geoopt
import pytest
import torch
import torch.nn.functional as F

from launch import estimate as est
from launch import head_memory as hm
from launch.__main__ import build_config
from model.chest import ChestHead, sample_triplets
from model.config import ChestConfig, LossConfig
from model.proxies import class_permutation, class_range, init_rows
from tests.numerics import assert_rel
from tests.test_chest_sharded import CASES, DIM_E, DIM_H, GLOBAL_BATCH, K, STEP, reference

RATE = 0.25
SAMPLED = {name: dataclasses.replace(cfg, sample_rate=RATE) for name, cfg in CASES.items()}
NO_REG = {
    f"{name}_tau0": dataclasses.replace(cfg, chest=dataclasses.replace(cfg.chest, tau=0.0))
    for name, cfg in SAMPLED.items()
    if name in ("chest", "softtriple")
}


def problem(num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(GLOBAL_BATCH, DIM_E, generator=g) * 2.0, torch.randint(
        0, num_classes, (GLOBAL_BATCH,), generator=g
    )


def run_head(cfg: LossConfig, num_classes: int, rank: int, world: int) -> dict:
    """One rank's loss, gradients and sampled table rows for its slice of the batch (STEP's sample)."""
    b = GLOBAL_BATCH // world
    x, labels = problem(num_classes)
    head = ChestHead(cfg, num_classes, DIM_E, rank, world)
    emb = x[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    out = head(emb, labels[rank * b : (rank + 1) * b], step=STEP)
    out["loss"].backward()
    index, _ = head.sample_columns(head.target_columns(labels), STEP)
    return {
        "loss": float(out["loss"].detach()),
        "emb_grad": emb.grad,
        "proxy_grad": head.proxies.grad.clone(),
        "replicated": {k: p.grad.clone() for k, p in head.replicated_parameters().items()},
        "rows": index + head.class_start,
    }


def sharded_rank(cfg: LossConfig, num_classes: int) -> dict:
    import torch.distributed as dist

    return run_head(cfg, num_classes, dist.get_rank(), dist.get_world_size())


def regulariser_reference(cfg: LossConfig, table: torch.Tensor, fc: torch.nn.Linear | None, world: int) -> torch.Tensor:
    """Spec 2.4 (SoftTriple's centre term) or 2.5-2.6 (HypHC, one triplet per class, tau / C) on every proxy."""
    ch, n = cfg.chest, table.shape[0]
    if ch.tau <= 0:
        return torch.zeros((), dtype=table.dtype)
    if cfg.name == "softtriple":
        w = F.normalize(table, dim=2)
        i, j = torch.triu_indices(K, K, 1)
        return ch.tau * torch.sqrt(2 + 1e-5 - 2 * (w[:, i] * w[:, j]).sum(-1)).sum() / (n * K * (K - 1))
    assert fc is not None
    ball = geoopt.PoincareBall(c=ch.curvature)
    v = fc(table.reshape(n * K, DIM_E))
    p_h = ball.expmap0(v * torch.clamp(ch.clip_radius / (v.norm(dim=1, keepdim=True) + 1e-5), max=1.0))
    p_h = p_h.view(n, K, DIM_H)
    t = sample_triplets(n, K, world, cfg.init_seed, STEP, ch.hyphc_negatives)
    c = torch.arange(n)
    a, b, neg = p_h[c, t.pos_i], p_h[c, t.pos_j], p_h[t.neg_class.clamp(0, n - 1), t.neg_k]
    d = torch.stack([ball.dist(a, b), ball.dist(a, neg), ball.dist(b, neg)], dim=1)
    s = torch.exp(-d).detach() if ch.hyphc_detach_sim else torch.exp(-d)
    per = (s * (1 - torch.softmax(ch.hyphc_sign * d / ch.gamma_hyp, dim=1))).sum(1)
    return ch.tau / n * (per * t.valid.to(per.dtype)).sum()


def dense_reference(cfg: LossConfig, num_classes: int, rows: torch.Tensor, world: int) -> dict:
    """fp64: class softmaxes over the table rows `rows` only, the regulariser over all rows."""
    table = (init_rows(cfg.init_seed, 0, num_classes, (K, DIM_E)) * cfg.chest.proxy_init_std).double()
    table.requires_grad_(True)
    fc = ChestHead(cfg, num_classes, DIM_E).fc
    fc = fc.double() if fc is not None else None
    perm = class_permutation(num_classes, cfg.init_seed) if cfg.chest.permute_classes else torch.arange(num_classes)
    x, labels = problem(num_classes)
    x = x.double().requires_grad_(True)
    kept = rows.sort().values
    target = torch.searchsorted(kept, perm[labels])
    assert torch.equal(kept[target], perm[labels]), "a positive class was not sampled"
    restricted = dataclasses.replace(
        cfg, sample_rate=1.0, chest=dataclasses.replace(cfg.chest, tau=0.0, permute_classes=False)
    )
    loss = reference(restricted, x, target, table[kept], fc, world) + regulariser_reference(cfg, table, fc, world)
    loss.backward()
    repl = {} if fc is None else {"fc.weight": fc.weight.grad, "fc.bias": fc.bias.grad}
    return {"loss": float(loss.detach()), "emb_grad": x.grad, "proxy_grad": table.grad, "replicated": repl}


def check(results: list[dict], cfg: LossConfig, num_classes: int, msg: str, tol: float = 1e-4) -> torch.Tensor:
    """Ranks' loss and gradients vs dense_reference on the union of their sampled rows; returns that union."""
    rows = torch.cat([r["rows"] for r in results])
    want = dense_reference(cfg, num_classes, rows, len(results))
    for r in results:
        assert r["loss"] == pytest.approx(want["loss"], rel=tol), msg
    assert_rel(torch.cat([r["emb_grad"] for r in results]), want["emb_grad"], f"{msg}: embedding grads", tol)
    assert_rel(torch.cat([r["proxy_grad"] for r in results]), want["proxy_grad"], f"{msg}: proxy grads", tol)
    if want["replicated"]:
        got = {k: sum(r["replicated"][k] for r in results) for k in want["replicated"]}
        flat = [torch.cat([d[k].flatten() for k in sorted(want["replicated"])]) for d in (got, want["replicated"])]
        assert_rel(flat[0], flat[1], f"{msg}: shared FC h", tol)
    return rows


def test_a_full_sample_equals_the_unsampled_head() -> None:
    """A rate just below 1 runs the sampled path with every class kept: the loss is bit-identical to the
    rate-1 head; gradients match to fp32 rounding (HypHC's rows go through h in a separate pass)."""
    for name, cfg in CASES.items():
        full = run_head(cfg, 10, 0, 1)
        sampled = run_head(dataclasses.replace(cfg, sample_rate=0.999999), 10, 0, 1)
        assert torch.equal(sampled["rows"], torch.arange(10)), name
        assert sampled["loss"] == full["loss"], name
        for key in ("emb_grad", "proxy_grad"):
            assert_rel(sampled[key], full[key], f"{name}: {key}", 1e-6, floor=0.0)
        if full["replicated"]:  # one vector: fc.bias alone is analytically 0
            flat = [
                torch.cat([d["replicated"][k].flatten() for k in sorted(full["replicated"])]) for d in (sampled, full)
            ]
            assert_rel(flat[0], flat[1], f"{name}: shared FC h", 1e-6, floor=0.0)


def test_one_process_equals_the_dense_loss_on_the_sampled_classes() -> None:
    for name, cfg in {**SAMPLED, **NO_REG}.items():
        rows = check([run_head(cfg, 40, 0, 1)], cfg, 40, f"{name} W=1")
        assert 10 <= rows.numel() < 40, name  # a strict subset: round(0.25 * 40) = 10 columns, or the positives


@pytest.mark.parametrize("class_chunk", [0, 3])  # 3: the sampled columns' softmax over chunks (chunked_softmax)
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_the_dense_loss_on_the_union_of_the_sampled_classes(
    dist_pool, world: int, class_chunk: int
) -> None:
    pool = dist_pool(world)
    for num_classes, cases in ((40, {**SAMPLED, **NO_REG}), (3, {k: SAMPLED[k] for k in ("chest", "softtriple")})):
        for name, cfg in cases.items():  # C = 3 < 4: one rank holds no class
            results = pool.run(sharded_rank, dataclasses.replace(cfg, class_chunk=class_chunk), num_classes)
            rows = check(results, cfg, num_classes, f"{name} C={num_classes} W={world}")
            if num_classes == 40:
                assert rows.numel() < num_classes, name


@pytest.mark.parametrize("world", [1, 4])
def test_unsampled_proxies_get_only_the_regulariser_gradient(dist_pool, world: int) -> None:
    """tau = 0: unsampled rows get exactly zero gradient, sampled ones not; tau > 0: HypHC / the centre
    term still reaches the unsampled rows (check() above pins its value)."""
    for name, cfg in {**NO_REG, "chest": SAMPLED["chest"], "softtriple": SAMPLED["softtriple"]}.items():
        assert cfg.sample_rate == RATE
        results = [run_head(cfg, 40, 0, 1)] if world == 1 else dist_pool(world).run(sharded_rank, cfg, 40)
        grad = torch.cat([r["proxy_grad"] for r in results]).flatten(1).abs().amax(1)  # [C]
        kept = torch.zeros(40, dtype=torch.bool)
        kept[torch.cat([r["rows"] for r in results])] = True
        assert bool((grad[kept] > 0).all()), name
        if cfg.chest.tau == 0:
            assert bool((grad[~kept] == 0).all()), name
        else:
            assert bool((grad[~kept] > 0).all()), name


def test_positives_always_sampled_and_the_sets_are_reproducible() -> None:
    cfg = SAMPLED["chest"]
    num_classes, world = 101, 4
    perm = class_permutation(num_classes, cfg.init_seed)
    heads = [ChestHead(cfg, num_classes, DIM_E, r, world) for r in range(world)]
    g = torch.Generator().manual_seed(0)
    for step in range(21):  # batches from under the budget of 6 columns per rank to well over it
        labels = torch.randint(0, num_classes, ((4, 16, 64)[step % 3],), generator=g)
        for r, head in enumerate(heads):
            lo, n = class_range(num_classes, r, world)
            col = head.target_columns(labels)
            index, new = head.sample_columns(col, step)
            positives = {int(p) - lo for p in perm[labels] if lo <= int(p) < lo + n}
            assert positives <= set(index.tolist())
            assert index.numel() == max(int(RATE * n + 0.5), len(positives))
            assert torch.equal(index, index.sort().values) and index.unique().numel() == index.numel()
            assert torch.equal(index[new[new >= 0]], col[col >= 0]) and torch.equal(new < 0, col < 0)
            # a fresh head (a resumed run) draws the same set; another step draws another one
            again, _ = ChestHead(cfg, num_classes, DIM_E, r, world).sample_columns(col, step)
            assert torch.equal(again, index)
    col = heads[0].target_columns(torch.tensor([], dtype=torch.long))
    assert not torch.equal(heads[0].sample_columns(col, 0)[0], heads[0].sample_columns(col, 1)[0])


def test_config_and_memory_estimate_accept_partial_fc_for_chest() -> None:
    for name, chest in (("chest", ChestConfig()), ("softtriple", CASES["softtriple"].chest)):
        LossConfig(name=name, sample_rate=0.1, chest=chest).validate()
        with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
            LossConfig(name=name, sample_rate=0.0, chest=chest).validate()
    chest = LossConfig(name="chest", sample_rate=0.5, chest=ChestConfig(proxies_per_class=3, hyp_dim=16))
    # G x C_local x (K per space) x rate fp32 blocks, three copies, plus the gathered [G, D] and its grad
    assert hm.logit_bytes(256, 4, chest, 32) == 256 * 4 * 3 * 2 * 4 * 3 // 2 + 256 * 32 * 8
    rows = {k: ("", [1]) for k in ("states", "head", "activations")}
    plan = est.Estimate(["rank 0"], {**rows, "logits": ("", [2**33])}, 1, [])  # the logits are the peak
    many = ["data.num_classes=200000"]
    assert "loss.sample_rate=0.1 (Partial FC" in est.fixes(build_config("mnist_chest", many), plan)
    assert "loss.sample_rate" not in est.fixes(build_config("mnist_chest", [*many, "loss.sample_rate=0.5"]), plan)
