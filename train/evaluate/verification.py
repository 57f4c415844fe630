"""Face verification on image pairs: the insightface 10-fold protocol (LFW, CFP-FP, AgeDB-30 .bin sets).

Owns the pair-level metrics (accuracy with a cross-validated threshold, VAL@FAR) and the flip-combination
of embeddings. Pure functions: the caller embeds both images of every pair (original and horizontally
flipped, combined with `flip_mean`) and gathers them; nothing here calls torch.distributed.

Protocol (docs/infra-lessons.md section 1.10), written from its description:
- Each embedding is L2-normalised; a pair's distance d is the squared L2 distance (0..4); the pair
  is predicted "same" iff d < t.
- Folds: KFold(num_folds, shuffle=False) over the pairs in file order (contiguous blocks, the first
  N % num_folds folds one pair longer). For each fold, the threshold on np.arange(0, 4, 0.01) with
  the best accuracy on the other folds (the first, i.e. lowest, on ties, as np.argmax) is applied
  to the held-out fold. Reported: mean and population std (np.std) of held-out accuracy, and the
  mean chosen threshold.
- VAL@FAR: on np.arange(0, 4, 0.001), the threshold with FAR = far_target on the training folds is
  interpolated (below), or 0 (accept nothing) if the training FAR never reaches the target; VAL and
  FAR are measured on the held-out fold and averaged ("val", "val_std", "far").
Distances are computed in fp64, as insightface's (its embeddings are collected into float64 numpy
arrays before normalising). A held-out fold without same pairs (or without different ones) counts VAL
(FAR) 0 where insightface divides by zero; real pair lists mix both in every fold.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import KFold

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


def flip_mean(emb: torch.Tensor, emb_flipped: torch.Tensor) -> torch.Tensor:
    """(emb + emb_flipped) / 2 in at least fp32: insightface's flip-sum up to the factor 2, which verification
    does not see (it compares unit vectors) but affine maps after it do. CHEST's FC h has a bias, so its
    space scored h(x + x_f) = h(x) + h(x_f) - b, another direction than the flip-sum in that space;
    h((x + x_f) / 2) = (h(x) + h(x_f)) / 2 is that flip-sum halved (and DistArc's norms stay on the spheres'
    scale in the pictures)."""
    if emb.shape != emb_flipped.shape:
        raise ValueError(
            f"emb {tuple(emb.shape)} and emb_flipped {tuple(emb_flipped.shape)} must have the same "
            "shape: embed the flipped copy of every image in the same order"
        )
    dtype = torch.promote_types(torch.promote_types(emb.dtype, emb_flipped.dtype), torch.float32)
    return (emb.to(dtype) + emb_flipped.to(dtype)) / 2


def _count_below(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """#(values < t) for every t: one sort plus a binary search instead of a [T, N] comparison."""
    return np.searchsorted(np.sort(values), thresholds, side="left")


def _rates(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(accuracy, VAL = TP / #same, FAR = FP / #different) per threshold; an empty class gives rate 0."""
    n_same, n_diff = int(same.sum()), int((~same).sum())
    tp = _count_below(dist[same], thresholds)
    fp = _count_below(dist[~same], thresholds)
    acc = (tp + n_diff - fp) / max(dist.size, 1)
    return acc, tp / max(n_same, 1), fp / max(n_diff, 1)


def _threshold_at_far(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """Threshold where the (non-decreasing, step) FAR curve reaches `target`.

    insightface calls scipy's interp1d(far, thresholds, kind="slinear"). FAR is a step function of
    the threshold, so `far` repeats values; scipy >= 1.9 rejects that ("Expect x to not have
    duplicates", insightface issues 2152 and 2290, where users pin scipy 1.8.1). This reproduces
    scipy <= 1.8: a degree-1 spline through the points in order, i.e. linear between the LAST
    threshold of one FAR plateau and the FIRST of the next, and the last threshold of a plateau at
    exactly its FAR. Equals interp1d wherever `far` is strictly increasing. One deliberate
    difference: at the largest FAR the old spline's last interval has zero length (its value
    degenerates to 0.0); this returns the last threshold, by the same last-of-plateau rule.
    """
    if far.max() < target:
        return 0.0  # insightface's fallback: the target FAR is never reached on the training folds
    hi = int(np.searchsorted(far, target, side="right"))  # first point with far > target
    if hi == far.size:
        return float(thresholds[-1])  # target equals the last plateau's FAR
    if hi == 0:
        return float(thresholds[0])  # unreachable here: far[0] is FAR at t = 0, i.e. 0 < target
    lo = hi - 1  # last point of the plateau at or below the target
    frac = (target - far[lo]) / (far[hi] - far[lo])
    return float(thresholds[lo] + frac * (thresholds[hi] - thresholds[lo]))


def _check_inputs(
    emb1: torch.Tensor, emb2: torch.Tensor, issame: torch.Tensor, num_folds: int, far_target: float
) -> np.ndarray:
    """Validated issame as a numpy bool array."""
    for name, emb in (("emb1", emb1), ("emb2", emb2)):
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or not emb.is_floating_point():
            raise ValueError(f"{name} must be a floating [N, D] tensor; got {getattr(emb, 'shape', type(emb))}")
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{name} has NaN or inf entries; check the model output before evaluating")
    if emb1.shape != emb2.shape:
        raise ValueError(
            f"emb1 {tuple(emb1.shape)} and emb2 {tuple(emb2.shape)} must have the same shape "
            "(row i of each is one pair)"
        )
    if not isinstance(issame, torch.Tensor) or issame.ndim != 1 or issame.shape[0] != emb1.shape[0]:
        raise ValueError(
            f"issame must be a 1-D tensor with one entry per pair ({emb1.shape[0]}); "
            f"got {getattr(issame, 'shape', type(issame))}"
        )
    if issame.dtype != torch.bool:
        if issame.is_floating_point() or not bool(((issame == 0) | (issame == 1)).all()):
            raise ValueError(f"issame must be bool (or 0/1 integers); got dtype {issame.dtype}")
        issame = issame.bool()
    n = emb1.shape[0]
    if not (isinstance(num_folds, int) and 2 <= num_folds <= n):
        raise ValueError(f"num_folds={num_folds!r} must be an int in [2, number of pairs = {n}]")
    if not 0.0 < far_target < 1.0:
        raise ValueError(f"far_target={far_target!r} must lie in (0, 1), e.g. 1e-3")
    same = issame.cpu().numpy()
    if same.all() or not same.any():
        raise ValueError(
            "issame must contain both same and different pairs; VAL@FAR and the threshold "
            "search are undefined otherwise"
        )
    return same


def verification_accuracy(
    emb1: torch.Tensor, emb2: torch.Tensor, issame: torch.Tensor, num_folds: int = 10, far_target: float = 1e-3
) -> dict[str, float]:
    """10-fold verification metrics of pairs (emb1[i], emb2[i]) with ground truth issame[i].

    Returns {"accuracy", "accuracy_std", "best_threshold", "val", "val_std", "far"}; see the module
    docstring for the protocol. emb1/emb2 are [N, D] (already flip-combined, `flip_mean`); issame is bool [N].
    """
    same = _check_inputs(emb1, emb2, issame, num_folds, far_target)
    e1 = torch.nn.functional.normalize(emb1.detach().double(), dim=1).cpu().numpy()
    e2 = torch.nn.functional.normalize(emb2.detach().double(), dim=1).cpu().numpy()
    dist = ((e1 - e2) ** 2).sum(axis=1)
    acc, best, val, far = [], [], [], []
    folds = KFold(n_splits=num_folds, shuffle=False).split(np.arange(dist.size))
    for train, test in folds:
        acc_train, _, _ = _rates(dist[train], same[train], ACC_THRESHOLDS)
        threshold = ACC_THRESHOLDS[int(np.argmax(acc_train))]  # first best on ties
        acc_test, _, _ = _rates(dist[test], same[test], np.array([threshold]))
        best.append(float(threshold))
        acc.append(float(acc_test[0]))
        _, _, far_train = _rates(dist[train], same[train], VAL_THRESHOLDS)
        t_far = _threshold_at_far(far_train, VAL_THRESHOLDS, far_target)
        _, val_test, far_test = _rates(dist[test], same[test], np.array([t_far]))
        val.append(float(val_test[0]))
        far.append(float(far_test[0]))
    return {
        "accuracy": float(np.mean(acc)),
        "accuracy_std": float(np.std(acc)),
        "best_threshold": float(np.mean(best)),
        "val": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
    }
