"""Poincare-ball maths, fp32 always, in one place (docs/losses.md section 2.1).

The ball of curvature -c (c > 0) is {x : c ||x||^2 < 1}, radius 1/sqrt(c). geoopt's
`PoincareBall(c)` is the same manifold (it stores k = -c). Pairwise distances use the Gram form
(one matmul plus norms), never a [N, M, D] broadcast:
    ||(-u) (+)_c v||^2 = ||u - v||^2 / (1 - 2c<u,v> + c^2 ||u||^2 ||v||^2)
    D_c(u, v)          = (2 / sqrt(c)) artanh(sqrt(c) ||(-u) (+)_c v||)
"""

from __future__ import annotations

import math

import torch

ARTANH_MAX = 1.0 - 1e-6  # fp32: 1 - 1e-7 is too close to 1 for a finite artanh gradient
MIN_NORM = 1e-15
SQRT_EPS = 1e-12  # sqrt(. + eps) keeps d sqrt / dx finite at coincident points


def _check_c(c: float) -> None:
    if not c > 0:
        raise ValueError(f"curvature c={c} must be > 0 (the ball has curvature -c)")


def _artanh(x: torch.Tensor) -> torch.Tensor:
    return torch.atanh(x.clamp(max=ARTANH_MAX))


def mobius_add(u: torch.Tensor, v: torch.Tensor, c: float) -> torch.Tensor:
    """u (+)_c v, row-wise (broadcasting over leading dims)."""
    _check_c(c)
    u, v = u.float(), v.float()
    uv = (u * v).sum(dim=-1, keepdim=True)
    uu = (u * u).sum(dim=-1, keepdim=True)
    vv = (v * v).sum(dim=-1, keepdim=True)
    num = (1 + 2 * c * uv + c * vv) * u + (1 - c * uu) * v
    den = 1 + 2 * c * uv + c * c * uu * vv
    return num / den.clamp_min(MIN_NORM)


def dist(u: torch.Tensor, v: torch.Tensor, c: float) -> torch.Tensor:
    """Geodesic distance between matching rows of u and v: (2/sqrt c) artanh(sqrt c ||(-u) (+) v||)."""
    _check_c(c)
    u, v = u.float(), v.float()
    uv = (u * v).sum(dim=-1)
    uu = (u * u).sum(dim=-1)
    vv = (v * v).sum(dim=-1)
    return dist_from_gram(uu, vv, uv, c)


def mobius_diff_sq_norm(uu: torch.Tensor, vv: torch.Tensor, uv: torch.Tensor, c: float) -> torch.Tensor:
    """||(-u) (+)_c v||^2 from squared norms and inner products; monotone in the distance (a ranking key)."""
    diff_sq = (uu + vv - 2 * uv).clamp_min(0.0)
    return diff_sq / (1 - 2 * c * uv + c * c * uu * vv).clamp_min(MIN_NORM)


def dist_from_gram(uu: torch.Tensor, vv: torch.Tensor, uv: torch.Tensor, c: float) -> torch.Tensor:
    """Distance from squared norms ||u||^2, ||v||^2 and inner products <u, v> (broadcasting)."""
    norm = torch.sqrt(mobius_diff_sq_norm(uu, vv, uv, c) + SQRT_EPS)
    return (2.0 / math.sqrt(c)) * _artanh(math.sqrt(c) * norm)


def pairwise_dist(u: torch.Tensor, v: torch.Tensor, c: float, chunk: int = 0) -> torch.Tensor:
    """All distances between rows of u [N, D] and v [M, D] -> [N, M] by the Gram form.

    `chunk` > 0 processes u in row blocks (bounded peak memory; autograd still works).
    """
    _check_c(c)
    u, v = u.float(), v.float()
    vv = (v * v).sum(dim=-1)
    if chunk <= 0 or u.shape[0] <= chunk:
        return dist_from_gram((u * u).sum(dim=-1)[:, None], vv[None, :], u @ v.t(), c)
    return torch.cat([pairwise_dist(part, v, c) for part in u.split(chunk)])


def expmap0(v: torch.Tensor, c: float) -> torch.Tensor:
    """Exponential map at the origin: tanh(sqrt(c)||v||) v / (sqrt(c)||v||)."""
    _check_c(c)
    v = v.float()
    sqrt_c = math.sqrt(c)
    norm = v.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    return torch.tanh(sqrt_c * norm) * v / (sqrt_c * norm)


def clip_features(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Feature clipping (Guo et al. 2021): rescale rows longer than `radius` to it; radius <= 0: off."""
    v = v.float()
    if radius <= 0:
        return v
    norm = v.norm(dim=-1, keepdim=True)
    return v * torch.clamp(radius / (norm + 1e-5), max=1.0)


def to_ball(v: torch.Tensor, c: float, clip_radius: float) -> torch.Tensor:
    """Euclidean features -> Poincare ball: expmap0(clip(v))."""
    return expmap0(clip_features(v, clip_radius), c)
