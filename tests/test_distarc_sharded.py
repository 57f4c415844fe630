"""Sharded DistArc == a dense single-process reference, in 1, 2 and 4 gloo processes.

The reference below is written independently of model.distarc: anchors as explicit vectors,
delta as a direct squared distance, cos(phi) from normalised vectors, torch's own logsumexp.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import LossConfig
from model.distarc import DistArcHead, sphere_radii
from model.proxies import init_rows

GLOBAL_BATCH, DIM = 8, 6
CASES = {
    "paper": LossConfig(
        name="distarc",
        form="paper",
        scale=1.0,
        margin=0.5,
        radial_weight=0.005,
        phi_weight=1.0,
        radius_start=2.0,
        radius_gap=1.0,
        num_spheres=3,
    ),
    "official": LossConfig(
        name="distarc",
        form="official",
        scale=2.0,
        margin=0.5,
        radial_weight=0.05,
        phi_weight=1.0,
        radius_start=2.0,
        radius_gap=1.0,
        num_spheres=3,
    ),
    "guard": LossConfig(
        name="distarc",
        form="paper",
        scale=4.0,
        margin=1.2,
        radial_weight=0.01,
        phi_weight=0.5,
        radius_start=1.0,
        radius_gap=0.5,
        num_spheres=2,
        theta_guard=True,
    ),
    "arcface": LossConfig(name="arcface", scale=16.0, margin=0.5),
    "cosface": LossConfig(name="cosface", scale=16.0, margin=0.35),
    "softmax": LossConfig(name="softmax"),
}


def dense_reference(
    cfg: LossConfig, x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, radii: torch.Tensor
) -> torch.Tensor:
    """The loss of docs/losses.md section 1.3/1.4 over the full table, written from the formulas."""
    n = x.shape[0]
    rows = torch.arange(n)
    if cfg.name == "softmax":
        return F.cross_entropy(x @ weight.t(), labels)
    w_hat = weight / weight.norm(dim=1, keepdim=True)
    cos = F.cosine_similarity(x[:, None, :], w_hat[None, :, :], dim=2).clamp(-1 + 1e-7, 1 - 1e-7)
    anchors = radii[:, None] * w_hat  # [C, D]
    delta = ((x[:, None, :] - anchors[None, :, :]) ** 2).sum(dim=2)
    lam = cfg.radial_weight if cfg.name == "distarc" else 0.0
    mu = cfg.phi_weight if cfg.name == "distarc" else 0.0
    logits = cfg.scale * cos - lam * delta
    theta_y = torch.acos(cos[rows, labels])
    if cfg.name == "cosface":
        margin_term = cfg.scale * (cos[rows, labels] - cfg.margin)
    else:
        m = cfg.margin
        arc = torch.cos(theta_y + m)
        if cfg.theta_guard:
            arc = torch.where(theta_y + m < math.pi, arc, cos[rows, labels] - math.sin(m) * m)
        margin_term = cfg.scale * arc
    resultant = x - anchors[labels]
    cos_phi = (F.normalize(resultant, dim=1) * (-w_hat[labels])).sum(dim=1)
    z_y = margin_term + mu * cos_phi - lam * delta[rows, labels]
    den = logits.clone()
    if cfg.name == "distarc" and cfg.form == "official":
        den[rows, labels] = margin_term
    else:
        den[rows, labels] = z_y
    return (torch.logsumexp(den, dim=1) - z_y).mean()


def make_problem(num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(GLOBAL_BATCH, DIM, generator=g) * 3.0
    labels = torch.randint(0, num_classes, (GLOBAL_BATCH,), generator=g)
    return x, labels


def sharded_rank(cfg: LossConfig, num_classes: int) -> dict:
    """Runs on every rank: local slice of the batch, local slice of the table, loss and grads."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    x, labels = make_problem(num_classes)
    b = GLOBAL_BATCH // world
    emb = x[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    head = DistArcHead(cfg, num_classes, DIM, rank, world)
    out = head(emb, labels[rank * b : (rank + 1) * b])
    out["loss"].backward()
    pred = head.predict(x)
    return {
        "loss": float(out["loss"]),
        "emb_grad": emb.grad,
        "weight": head.weight.detach().clone(),
        "weight_grad": head.weight.grad,
        "class_start": head.class_start,
        "pred": pred,
    }


@pytest.mark.parametrize("class_chunk", [0, 2])  # 2: the softmax over chunks of 2 classes (chunked_softmax)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_loss_and_grads_equal_dense(dist_pool, world: int, class_chunk: int) -> None:
    pool = dist_pool(world)
    for num_classes in (10, 3):  # 3 < 4 ranks: one rank holds no class
        for name, cfg in CASES.items():
            results = pool.run(sharded_rank, dataclasses.replace(cfg, class_chunk=class_chunk), num_classes)
            x, labels = make_problem(num_classes)
            table = init_rows(cfg.init_seed, 0, num_classes, (DIM,))
            if cfg.name == "softmax":
                table = table * 0.01
            weight = torch.cat([r["weight"] for r in results])
            torch.testing.assert_close(weight, table, rtol=0, atol=0)  # init does not depend on world size
            x_ref = x.clone().requires_grad_(True)
            w_ref = table.clone().requires_grad_(True)
            radii = sphere_radii(torch.arange(num_classes), cfg.radius_start, cfg.radius_gap, cfg.num_spheres)
            loss = dense_reference(cfg, x_ref, labels, w_ref, radii)
            loss.backward()
            for r in results:
                assert r["loss"] == pytest.approx(float(loss), rel=1e-5), (name, num_classes)
            torch.testing.assert_close(
                torch.cat([r["emb_grad"] for r in results]),
                x_ref.grad,
                rtol=1e-5,
                atol=1e-7,
                msg=f"{name} C={num_classes}: embedding grads",
            )
            torch.testing.assert_close(
                torch.cat([r["weight_grad"] for r in results]),
                w_ref.grad,
                rtol=1e-5,
                atol=1e-7,
                msg=f"{name} C={num_classes}: weight grads",
            )
            # predictions: argmin distance to anchors and argmax cosine over the whole table
            w_hat = F.normalize(table, dim=1)
            dist_ref = torch.cdist(x, radii[:, None] * w_hat).argmin(dim=1)
            cos_ref = (F.normalize(x, dim=1) @ w_hat.t()).argmax(dim=1)
            for r in results:
                # the measure only where radii are learned (DistArc); ArcFace & co. predict by cosine alone
                assert ("measure" in r["pred"]) == (cfg.name == "distarc"), name
                if cfg.name == "distarc":
                    assert torch.equal(r["pred"]["measure"], dist_ref), name
                assert torch.equal(r["pred"]["cosine"], cos_ref), name
                # the plain softmax also by its own logits (its rows' norms differ)
                assert ("logit" in r["pred"]) == (cfg.name == "softmax"), name
                if cfg.name == "softmax":
                    assert torch.equal(r["pred"]["logit"], (x @ table.t()).argmax(dim=1)), name


def sharded_rank_by_reduce_scatter(cfg: LossConfig, num_classes: int) -> dict:
    """`sharded_rank` through NCCL's branch of the embedding gradient (a reduce-scatter; gloo has one in
    recent torch), counting the reduce-scatters it made."""
    import torch.distributed as dist

    import model.collectives as collectives

    calls = []
    saved_backends, saved_op = collectives.REDUCE_SCATTER_BACKENDS, dist.reduce_scatter_tensor
    collectives.REDUCE_SCATTER_BACKENDS = saved_backends | {dist.get_backend()}
    dist.reduce_scatter_tensor = lambda *a, **k: calls.append(1) or saved_op(*a, **k)
    try:
        return {**sharded_rank(cfg, num_classes), "reduce_scatters": len(calls)}
    finally:
        collectives.REDUCE_SCATTER_BACKENDS, dist.reduce_scatter_tensor = saved_backends, saved_op


@pytest.mark.parametrize("world", [2, 4])
def test_the_reduce_scatter_branch_gives_the_all_reduce_gradients(dist_pool, world: int) -> None:
    """The branch NCCL takes (never run on CPU otherwise) gives the gradients the gloo branch does, which
    test_sharded_loss_and_grads_equal_dense checks against the dense reference."""
    pool = dist_pool(world)
    for num_classes in (10, 3):
        ours = pool.run(sharded_rank_by_reduce_scatter, CASES["paper"], num_classes)
        reference = pool.run(sharded_rank, CASES["paper"], num_classes)
        for mine, ref in zip(ours, reference):
            assert mine["reduce_scatters"] == 1
            assert mine["loss"] == ref["loss"]
            torch.testing.assert_close(mine["emb_grad"], ref["emb_grad"], rtol=0, atol=1e-7)
            torch.testing.assert_close(mine["weight_grad"], ref["weight_grad"], rtol=0, atol=0)


def test_distarc_without_radial_terms_is_arcface() -> None:
    cfg = dataclasses.replace(CASES["paper"], radial_weight=0.0, phi_weight=0.0, scale=64.0)
    x, labels = make_problem(10)
    table = init_rows(cfg.init_seed, 0, 10, (DIM,))
    radii = sphere_radii(torch.arange(10), 2.0, 1.0, 3)
    from model.distarc import distarc_loss

    ours = distarc_loss(x, labels, table, radii, cfg)
    arc = dense_reference(LossConfig(name="arcface", scale=64.0, margin=0.5), x, labels, table, radii)
    assert float(ours) == pytest.approx(float(arc), rel=1e-6)
