"""model/hyperbolic.py against geoopt and closed forms (docs/losses.md sections 2.1 and 4.4).

The module always computes in fp32 (it casts fp64 input down), so every comparison with an fp64
reference (geoopt in fp64, the arcosh form in fp64) uses an fp32 tolerance: 1e-5 relative, about
10x the largest error measured for points up to 0.95 of the ball radius.
"""

from __future__ import annotations

import math

import geoopt
import pytest
import torch

from model.hyperbolic import clip_features, dist, expmap0, mobius_add, pairwise_dist, to_ball

CURVATURES = [0.1, 0.5, 1.0, 2.0]
RTOL = 1e-5


def ball_points(n: int, d: int, c: float, seed: int, max_frac: float = 0.95) -> torch.Tensor:
    """fp32 points with uniform random radius in [0, max_frac / sqrt(c)) and random direction."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    radius = torch.rand(n, 1, generator=gen, dtype=torch.float64) * max_frac / math.sqrt(c)
    return (x / x.norm(dim=1, keepdim=True) * radius).float()


def arcosh_dist64(u: torch.Tensor, v: torch.Tensor, c: float) -> torch.Tensor:
    """fp64 reference: arccosh(1 + 2c||u-v||^2 / ((1-c||u||^2)(1-c||v||^2))) / sqrt(c), all pairs."""
    u, v = u.double(), v.double()
    diff = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
    den = (1 - c * (u * u).sum(-1))[:, None] * (1 - c * (v * v).sum(-1))[None, :]
    return torch.acosh(1 + 2 * c * diff / den) / math.sqrt(c)


def mobius_dist64(u: torch.Tensor, v: torch.Tensor, c: float) -> torch.Tensor:
    """fp64 reference by the Moebius definition (2/sqrt c) artanh(sqrt c ||(-u) (+) v||), all pairs."""
    u, v = u.double()[:, None, :], v.double()[None, :, :]
    uv, uu, vv = (-u * v).sum(-1, keepdim=True), (u * u).sum(-1, keepdim=True), (v * v).sum(-1, keepdim=True)
    num = (1 + 2 * c * uv + c * vv) * (-u) + (1 - c * uu) * v
    den = 1 + 2 * c * uv + c * c * uu * vv
    return 2 / math.sqrt(c) * torch.atanh(math.sqrt(c) * (num / den).norm(dim=-1))


@pytest.mark.parametrize("c", CURVATURES)
def test_matches_geoopt_fp64(c: float) -> None:
    ball = geoopt.PoincareBall(c=c)
    # geoopt 0.5.1 stores the curvature as k = -c (stereographic model with negative k)
    assert ball.k.item() == pytest.approx(-c, rel=1e-6) and ball.c.item() == pytest.approx(c, rel=1e-6)
    u, v = ball_points(64, 8, c, seed=1), ball_points(64, 8, c, seed=2)
    u64, v64 = u.double(), v.double()  # same values; geoopt runs them in fp64

    ref = ball.mobius_add(u64, v64)
    got = mobius_add(u, v, c)
    assert got.dtype == torch.float32
    assert ((got.double() - ref).norm(dim=1) / ref.norm(dim=1)).max() < RTOL

    torch.testing.assert_close(dist(u, v, c).double(), ball.dist(u64, v64), rtol=RTOL, atol=0)

    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)) * 2
    ref_e = ball.expmap0(w.double(), project=False)
    got_e = expmap0(w, c).double()
    assert ((got_e - ref_e).norm(dim=1) / ref_e.norm(dim=1)).max() < RTOL


def test_three_distance_forms_agree_in_fp64() -> None:
    # the identity itself (spec: verified to 1e-15), independent of the fp32 module
    u, v = ball_points(9, 5, 0.5, seed=4).double(), ball_points(11, 5, 0.5, seed=5).double()
    torch.testing.assert_close(arcosh_dist64(u, v, 0.5), mobius_dist64(u, v, 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c", CURVATURES)
def test_pairwise_gram_form_matches_moebius_and_arcosh(c: float) -> None:
    u, v = ball_points(23, 6, c, seed=6), ball_points(17, 6, c, seed=7)
    ref = arcosh_dist64(u, v, c)
    gram = pairwise_dist(u, v, c)
    assert gram.shape == (23, 17) and gram.dtype == torch.float32
    torch.testing.assert_close(gram.double(), ref, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(dist(u[:, None], v[None], c).double(), ref, rtol=RTOL, atol=1e-6)
    moebius = 2 / math.sqrt(c) * torch.atanh(math.sqrt(c) * mobius_add(-u[:, None], v[None], c).norm(dim=-1))
    torch.testing.assert_close(moebius.double(), ref, rtol=RTOL, atol=1e-6)


def test_chunked_pairwise_equals_unchunked_values_and_grads() -> None:
    c = 0.5
    u0, v0 = ball_points(23, 6, c, seed=8), ball_points(19, 6, c, seed=9)
    weights = torch.randn(23, 19, generator=torch.Generator().manual_seed(10))
    results = {}
    for chunk in (0, 7, 100):  # 100 >= rows: the unchunked path again
        u, v = u0.clone().requires_grad_(), v0.clone().requires_grad_()
        out = pairwise_dist(u, v, c, chunk=chunk)
        (out * weights).sum().backward()
        assert u.grad is not None and v.grad is not None
        results[chunk] = (out.detach(), u.grad, v.grad)
    for chunk in (7, 100):
        for got, ref in zip(results[chunk], results[0]):
            # a row block of a GEMM may round differently from the whole GEMM (a few ulp of <u,v>),
            # and artanh near the rim amplifies that: measured ~2e-6 of the largest entry
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("c", CURVATURES)
def test_distance_from_origin_is_twice_the_tangent_norm(c: float) -> None:
    w = torch.randn(32, 8, generator=torch.Generator().manual_seed(11))
    w = w / w.norm(dim=1, keepdim=True) * torch.linspace(0.05, 2.3, 32)[:, None]
    d0 = dist(torch.zeros_like(w), expmap0(w, c), c)
    torch.testing.assert_close(d0, 2 * w.norm(dim=1), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("c", [1e-6, 1e-8])
def test_small_curvature_limit_is_twice_euclidean(c: float) -> None:
    # small points (norm <= 1): D_c = 2||u-v|| (1 + O(c ||x||^2)), far below fp32 rounding here
    u, v = ball_points(16, 4, 1.0, seed=12), ball_points(16, 4, 1.0, seed=13)
    torch.testing.assert_close(dist(u, v, c), 2 * (u - v).norm(dim=1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pairwise_dist(u, v, c), 2 * torch.cdist(u, v), rtol=1e-4, atol=1e-6)


# At c = 2 the antipodal artanh argument is 1 - 4.5e-6, where fp32 spacing (6e-8) moves the
# distance by ~1e-2 (measured +0.0098 over 9.2); for c <= 1 the overshoot is < 1e-5.
@pytest.mark.parametrize("c,tol", [(0.1, 1e-3), (0.5, 1e-3), (1.0, 1e-3), (2.0, 2e-2)])
def test_clipped_points_are_within_four_radii(c: float, tol: float) -> None:
    gen = torch.Generator().manual_seed(14)
    v = torch.randn(40, 8, generator=gen) * torch.logspace(-2, 6, 40)[:, None]  # up to huge norms
    v = torch.cat([v, -v])  # antipodal pairs: the largest distances
    x = to_ball(v, c, 2.3)
    assert torch.equal(x, expmap0(clip_features(v, 2.3), c))
    d = pairwise_dist(x, x, c)
    assert torch.isfinite(d).all()
    assert d.max() <= 4 * 2.3 + tol
    assert d.max() >= 4 * 2.3 - 1e-2  # the bound is attained by the clipped antipodal pairs


def test_gradients_finite_at_coincident_and_boundary_points() -> None:
    c = 0.5
    for v in (torch.randn(8, 6), torch.randn(8, 6) * 1e4):  # moderate, then clipped to the rim
        leaf = v.clone().requires_grad_()
        x = to_ball(leaf, c, 2.3)
        d = pairwise_dist(x, x, c)  # includes u == v on the diagonal
        d.sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
        # Gram-form cancellation: ||u||^2 + ||v||^2 - 2<u,v> has fp32 error ~eps ||u||^2, divided by
        # (1 - c||u||^2)^2 ~ 0.02 at the clipped rim, so the self-distance is ~1e-2, not 0
        assert torch.isfinite(d).all() and d.diagonal().abs().max() < 2e-2


@pytest.mark.parametrize("c", [0.0, -0.5, float("nan")])
def test_non_positive_curvature_raises(c: float) -> None:
    x = torch.zeros(2, 3)
    for call in (
        lambda: mobius_add(x, x, c),
        lambda: dist(x, x, c),
        lambda: pairwise_dist(x, x, c),
        lambda: expmap0(x, c),
        lambda: to_ball(x, c, 2.3),
    ):
        with pytest.raises(ValueError, match="curvature"):
            call()


def test_bf16_inputs_give_fp32_and_finite_values_and_grads() -> None:
    # spec worst case: clip 2.3, c = 0.5, antipodal points (artanh argument ~0.997)
    c = 0.5
    base = torch.randn(16, 8, generator=torch.Generator().manual_seed(15)) * 100
    leaf = torch.cat([base, -base]).bfloat16().requires_grad_()
    x = to_ball(leaf, c, 2.3)
    assert x.dtype == torch.float32
    d = pairwise_dist(x, x, c)
    row = dist(x[:16], x[16:], c)
    xb = x.detach().bfloat16()  # bf16 points near the rim (still inside the ball after rounding)
    mob = mobius_add(xb[:16], xb[16:], c)
    for out in (d, row, mob, expmap0(leaf, c), clip_features(leaf, 2.3)):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    (d.sum() + row.sum()).backward()
    assert leaf.grad is not None and leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad).all()
    assert row.max() <= 4 * 2.3 + 1e-3
