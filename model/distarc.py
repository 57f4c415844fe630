"""DistArc (HyperSpaceX, ECCV 2024) on a class-sharded weight table, with its baselines.

Symbols follow docs/losses.md section 1: x raw embedding, w_hat unit class direction,
r_j class radius, anchor a_j = r_j w_hat_j, delta_j = ||x - a_j||^2, cos(phi_y) the angle at the
anchor between "towards x" and "towards the origin". ArcFace is the special case lambda = mu = 0,
CosFace swaps the angular margin for an additive cosine one, "softmax" is a plain linear softmax.

All maths is fp32 whatever the input dtype (bf16 rounds 1 - 1e-7 to 1 and acos' gradient blows up).

Legend: G = global batch (gathered), C = classes on this rank (or all classes when dense), D = dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from common.seeds import stable_seed
from model.chunked_softmax import chunked_sharded_argmin, chunked_sharded_cross_entropy
from model.collectives import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_sum_no_grad,
    sharded_cross_entropy,
)
from model.config import LossConfig
from model.proxies import ShardedHead, check_label_range, class_range, init_rows, sample_local_classes

COS_EPS = 1e-7  # official clamp of cos(theta) to [-1 + eps, 1 - eps]
PHI_EPS = 1e-12  # ||x - a_y|| floor in cos(phi_y) (F.normalize's eps)


def sphere_radii(class_ids: torch.Tensor, radius_start: float, radius_gap: float, num_spheres: int) -> torch.Tensor:
    """r_j = r_0 + g * (j mod S): round-robin of global class ids over S concentric spheres."""
    return radius_start + radius_gap * (class_ids % num_spheres).to(torch.float32)


def margin_at(cfg: LossConfig, step: int) -> float:
    """The margin in force at optimizer step `step` (linear warm-up from 0 when configured)."""
    if cfg.margin_warmup_steps <= 0:
        return cfg.margin
    return cfg.margin * min(1.0, step / cfg.margin_warmup_steps)


def _arc_margin(cos_t: torch.Tensor, margin: float, theta_guard: bool) -> torch.Tensor:
    """cos(theta + m); with the guard, ArcFace's monotone fallback beyond theta > pi - m."""
    with_margin = torch.cos(torch.acos(cos_t) + margin)
    if not theta_guard:
        return with_margin
    return torch.where(cos_t > math.cos(math.pi - margin), with_margin, cos_t - math.sin(margin) * margin)


def distarc_logits(
    emb_GD: torch.Tensor,
    target_col_G: torch.Tensor,
    weight_CD: torch.Tensor,
    radii_C: torch.Tensor,
    cfg: LossConfig,
    margin: float,
) -> dict[str, torch.Tensor]:
    """Denominator logits over the given classes, and the numerator logit where the class is ours.

    Args:
        target_col_G: column of `weight_CD` holding each sample's class, -1 where it is elsewhere.

    Returns a dict with "logits" [G, C], "target" [G], "owner" [G] bool, and the detached per-sample
    terms "delta_y", "cos_y", "cos_phi_y" (zero where not owned) for logging. In the paper form the logits
    and the target are Eq. 1's plus lam ||x||^2 (the same for every class of a sample: the same loss).
    """
    x = emb_GD.float()
    num_local = weight_CD.shape[0]
    owner = target_col_G >= 0
    rows = torch.arange(x.shape[0], device=x.device)
    y_idx = target_col_G.clamp(0, max(num_local - 1, 0))

    if cfg.name == "softmax":
        logits = x @ weight_CD.float().t()
        target = logits[rows, y_idx] if num_local else torch.zeros_like(x[:, 0])
        zero = torch.zeros_like(target)
        return {"logits": logits, "target": target, "owner": owner, "delta_y": zero, "cos_y": zero, "cos_phi_y": zero}

    x_norm = x.norm(dim=1).clamp_min(1e-12)
    w_hat = F.normalize(weight_CD.float(), dim=1, eps=1e-12)
    dot = x @ w_hat.t()  # x . w_hat_j = ||x|| cos(theta_j)
    cos = (dot / x_norm[:, None]).clamp(-1 + COS_EPS, 1 - COS_EPS)
    s = cfg.scale
    radial = cfg.name == "distarc" and cfg.radial_weight > 0
    use_phi = cfg.name == "distarc" and cfg.phi_weight != 0
    lam = cfg.radial_weight if radial else 0.0

    # The paper form's logits all hold the sample's own -lam ||x||^2 (every delta_j and delta_y has it): a
    # constant per sample, which the softmax cancels exactly but fp32 gradients do not (2 lam x per logit,
    # summed to zero with rounding: the embedding gradient's error against fp64 was 2.5e-5 at ||x|| = 300 and
    # 1.4e-2 at 3000; without it 2.9e-6 and 9.8e-6). Dropped there; the official form's denominator target has
    # no delta, so it keeps it.
    common = 0.0 if cfg.form != "official" else lam
    x_sq = x_norm**2
    if radial:
        # s cos - lam * delta, delta = ||x||^2 + r^2 - 2 r (x . w_hat), without materialising delta:
        # fewer [G, C] temporaries (DistArc's cost over ArcFace is these elementwise passes).
        bias = -(common * x_sq[:, None] + (lam * radii_C**2)[None, :])
        logits = torch.addcmul(bias, dot, (2 * lam * radii_C)[None, :]).add_(cos, alpha=s)
    else:
        logits = s * cos

    if num_local == 0:
        zero = torch.zeros_like(x[:, 0])
        return {"logits": logits, "target": zero, "owner": owner, "delta_y": zero, "cos_y": zero, "cos_phi_y": zero}

    cos_y = cos[rows, y_idx]
    r_y = radii_C[y_idx]
    # The target's terms come from the explicit difference R_y = x - r_y w_hat_y, not from the GEMM form
    # ||x||^2 + r^2 - 2 r x.w_hat: near the anchor that form cancels catastrophically (at r = 100 a sample
    # 0.02 away gets delta ~ +-1e-3 of rounding, and cos(phi) = (r - x.w_hat) / sqrt(delta) explodes to
    # ~1e3 with gradients ~1e6 in fp32). [G, D] gathers, no [G, C] cost.
    w_hat_y = w_hat[y_idx]
    diff = x - r_y[:, None] * w_hat_y
    delta_y = (diff * diff).sum(dim=1)
    if cfg.name == "cosface":
        margin_term = s * (cos_y - margin)
    else:
        margin_term = s * _arc_margin(cos_y, margin, cfg.theta_guard)
    # cos(phi_y) = R_hat_y . (-w_hat_y); normalise-with-eps semantics: 0 when x sits on its anchor
    # (vector_norm's gradient at 0 is 0, and the clamp keeps the quotient finite).
    cos_phi = -(diff * w_hat_y).sum(dim=1) / torch.linalg.vector_norm(diff, dim=1).clamp_min(PHI_EPS)
    phi_term = cfg.phi_weight * cos_phi if use_phi else torch.zeros_like(cos_y)
    if common:  # the official form: lam delta_y
        radial_y = lam * delta_y
    else:  # the paper form: lam (delta_y - ||x||^2) = lam r_y (r_y - 2 x . w_hat_y) (see `common`)
        radial_y = lam * r_y * (r_y - 2 * (x * w_hat_y).sum(dim=1))
    z_y = margin_term + phi_term - radial_y

    if cfg.name == "distarc" and cfg.form == "official":
        # Released code: the denominator's target logit carries neither delta nor phi.
        den_y, target = margin_term, z_y
    else:
        den_y, target = z_y, z_y
    # the owner's target column takes the margin logit (index_put: one copy, no [G, C] one-hot)
    logits = logits.index_put((rows[owner], y_idx[owner]), den_y[owner])
    mask = owner.float()
    return {
        "logits": logits,
        "target": target,
        "owner": owner,
        "delta_y": (delta_y * mask).detach(),
        "cos_y": (cos_y * mask).detach(),
        "cos_phi_y": (cos_phi * mask).detach(),
    }


def anchor_sq_distance(emb_GD: torch.Tensor, weight_CD: torch.Tensor, radii_C: torch.Tensor) -> torch.Tensor:
    """delta_j = ||x - r_j w_hat_j||^2 for every sample and class (the predictive measure, squared), in fp64.

    losses.md 1.6 asks for the direct distance because the expanded form ||x||^2 + r^2 - 2 r x.w_hat cancels
    near an anchor: in fp32 at r = 100 every delta below ~1e-3 came out 0 and the lowest class id won. The
    direct [G, C, D] difference does not fit for many classes; the expanded form in fp64 errs by ~1e-16 x
    (||x||^2 + r^2), less than the direct distance in fp32 (whose r * w_hat alone is off by ~r x 6e-8)."""
    x = emb_GD.double()
    w_hat = F.normalize(weight_CD.double(), dim=1, eps=1e-12)
    radii = radii_C.double()[None, :]
    x_sq = (x * x).sum(dim=1, keepdim=True)
    return (x_sq + radii**2 - 2 * radii * (x @ w_hat.t())).clamp_min(0.0)


def cosine_scores(emb_GD: torch.Tensor, weight_CD: torch.Tensor) -> torch.Tensor:
    """cos(theta_j) for every sample and class."""
    return F.normalize(emb_GD.float(), dim=1, eps=1e-12) @ F.normalize(weight_CD.float(), dim=1, eps=1e-12).t()


class DistArcHead(ShardedHead):
    """This rank's slice of the class table and the sharded DistArc loss over the global batch.

    Kept outside the DeepSpeed engine (with its own optimizer): its rows differ per rank and must
    never be averaged across ranks.
    """

    radii: torch.Tensor

    def __init__(
        self,
        cfg: LossConfig,
        num_classes: int,
        embed_dim: int,
        rank: int = 0,
        world_size: int = 1,
        group: ProcessGroup | None = None,
        embedding_grad_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.cfg, self.num_classes, self.embed_dim = cfg, num_classes, embed_dim
        self.group, self.embedding_grad_scale = group, embedding_grad_scale
        self.class_start, self.num_local = class_range(num_classes, rank, world_size)
        rows = init_rows(cfg.init_seed, self.class_start, self.num_local, (embed_dim,))
        self.weight = nn.Parameter(rows * 0.01 if cfg.name == "softmax" else rows)
        ids = torch.arange(self.class_start, self.class_start + self.num_local)
        self.register_buffer(
            "radii", sphere_radii(ids, cfg.radius_start, cfg.radius_gap, cfg.num_spheres), persistent=False
        )

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """Loss of the global batch (same value on every rank) and its detached parts."""
        if emb_BD.shape[-1] != self.embed_dim:
            raise ValueError(
                f"embedding dimension {emb_BD.shape[-1]} != head's {self.embed_dim}: "
                "set model.embed_dim to the same value the head was built with"
            )
        emb_GD = all_gather_with_grad(emb_BD.float(), self.group, self.embedding_grad_scale)
        labels_G = all_gather_no_grad(labels_B, self.group)
        check_label_range(labels_G, self.num_classes)
        local_y = labels_G - self.class_start
        target_col = torch.where((local_y >= 0) & (local_y < self.num_local), local_y, -1)
        weight: torch.Tensor = self.weight
        radii = self.radii
        if self.cfg.sample_rate < 1.0:  # Partial-FC: a random subset of negatives, all positives
            gen = torch.Generator().manual_seed(stable_seed(self.cfg.init_seed, step, self.class_start))
            index, target_col = sample_local_classes(target_col, self.num_local, self.cfg.sample_rate, gen)
            weight = F.embedding(index, weight, sparse=True) if self.sparse_row_grads else weight[index]
            radii = radii[index]
        margin = margin_at(self.cfg, step)
        if self.cfg.class_chunk > 0:
            loss_G, parts = self._chunked_loss(emb_GD, target_col, weight, radii, margin)
        else:
            out = distarc_logits(emb_GD, target_col, weight, radii, self.cfg, margin)
            loss_G = sharded_cross_entropy(out["logits"], out["target"], out["owner"], self.group)
            parts = torch.stack([out["delta_y"], out["cos_y"], out["cos_phi_y"]])
        parts = all_reduce_sum_no_grad(parts, self.group) / max(labels_G.numel(), 1)
        return {
            "loss": loss_G.mean(),
            "radial": parts[0].sum(),
            "cos_target": parts[1].sum(),
            "cos_phi": parts[2].sum(),
            "emb_norm": emb_GD.detach().norm(dim=1).mean(),
        }

    def _chunked_loss(
        self, emb_GD: torch.Tensor, target_col: torch.Tensor, weight: torch.Tensor, radii: torch.Tensor, margin: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """loss_G and the logged parts [3, G], the softmax taken loss.class_chunk classes at a time."""

        def chunk_logits(
            x: torch.Tensor, rows: torch.Tensor, start: int, cols: torch.Tensor
        ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
            out = distarc_logits(x, cols, rows, radii[start : start + rows.shape[0]], self.cfg, margin)
            return [out["logits"]], [out["target"]], torch.stack([out["delta_y"], out["cos_y"], out["cos_phi_y"]])

        loss_1G, parts = chunked_sharded_cross_entropy(
            chunk_logits, emb_GD, weight, target_col, self.cfg.class_chunk, self.group, num_stats=3
        )
        return loss_1G[0], parts

    def sharded_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    @torch.no_grad()
    def predict(self, emb_GD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class ids by cosine argmax and, for DistArc with lambda > 0 (the only head that learns radii; with
        lambda = 0 it is ArcFace and predicts by cosine, docs/losses.md 1.7), by the predictive measure
        (argmin ||x - a_j||); for the plain softmax also by its own logits (argmax x . w_j: its
        rows' norms differ, so the cosine rule is not the rule it was trained for).

        `emb_GD` must be the same on every rank; the reduction spans the class shards.
        """

        def values(start: int, stop: int) -> dict[str, torch.Tensor]:
            rows = self.weight[start:stop]
            out = {"cosine": -cosine_scores(emb_GD, rows)}
            # the measure wherever the radii shape the loss: lambda > 0, or mu != 0 (cos(phi) is measured from
            # the anchors); lambda = mu = 0 is ArcFace, whose prediction is the cosine (losses.md 1.7)
            if self.cfg.name == "distarc" and (self.cfg.radial_weight > 0 or self.cfg.phi_weight != 0):
                out["measure"] = anchor_sq_distance(emb_GD, rows, self.radii[start:stop])
            if self.cfg.name == "softmax":
                out["logit"] = -(emb_GD.float() @ rows.float().t())
            return out

        chunk = self.cfg.class_chunk or self.num_local  # loss.class_chunk bounds evaluation's blocks too
        return chunked_sharded_argmin(values, self.num_local, chunk, self.class_start, self.group)


# ---- single-process reference API (plain tensors, the full table) -----------------------------


def distarc_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    radii: torch.Tensor,
    cfg: LossConfig | None = None,
    margin: float | None = None,
) -> torch.Tensor:
    """Mean DistArc loss of `emb` [N, D] against the whole table `weight` [C, D] with radii [C]."""
    cfg = cfg or LossConfig()
    out = distarc_logits(emb, labels, weight, radii.float(), cfg, cfg.margin if margin is None else margin)
    lse = torch.logsumexp(out["logits"], dim=1)
    return (lse - out["target"]).mean()


def predict(emb: torch.Tensor, weight: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Predicted class per row of `emb`: argmin_j ||x - r_j w_hat_j|| (the predictive measure)."""
    return anchor_sq_distance(emb, weight, radii.float()).argmin(dim=1)
