"""train/evaluate/verification.py: the insightface 10-fold protocol, checked against an independent brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline, interp1d

from train.evaluate.verification import VAL_THRESHOLDS, _threshold_at_far, flip_mean, verification_accuracy


def pairs_at_distances(dist: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D unit embeddings whose squared L2 distance is `dist`: angle arccos(1 - d/2) apart."""
    angle = torch.from_numpy(np.arccos(1 - dist / 2)).double()
    rot = torch.rand(dist.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 6.28
    e1 = torch.stack([rot.cos(), rot.sin()], 1)
    e2 = torch.stack([(rot + angle).cos(), (rot + angle).sin()], 1)
    return 3.0 * e1, 0.5 * e2  # arbitrary norms: the protocol L2-normalises first


def brute_force(dist: np.ndarray, same: np.ndarray, folds: int, far_target: float) -> dict[str, float]:
    """The protocol written out: contiguous folds, loops over the accuracy grid, dense FAR matrix."""
    n = dist.size
    sizes = [n // folds + (1 if i < n % folds else 0) for i in range(folds)]
    starts = np.cumsum([0] + sizes)
    acc, best, val, far = [], [], [], []
    for i in range(folds):
        test = np.arange(starts[i], starts[i + 1])
        train = np.setdiff1d(np.arange(n), test)
        scores = [np.mean((dist[train] < t) == same[train]) for t in np.arange(0, 4, 0.01)]
        t_best = np.arange(0, 4, 0.01)[int(np.argmax(scores))]
        best.append(t_best)
        acc.append(np.mean((dist[test] < t_best) == same[test]))
        neg = dist[train][~same[train]]
        far_train = (neg[None, :] < VAL_THRESHOLDS[:, None]).mean(1)
        if far_train.max() < far_target:
            t_far = 0.0
        else:  # what scipy <= 1.8 interp1d(kind="slinear") built: a degree-1 B-spline
            t_far = float(BSpline(np.r_[far_train[0], far_train, far_train[-1]], VAL_THRESHOLDS, 1)(far_target))
        accepted = dist[test] < t_far
        # a fold without same (or different) pairs: rate 0 by the module's convention (insightface
        # would divide by zero)
        val.append(accepted[same[test]].mean() if same[test].any() else 0.0)
        far.append(accepted[~same[test]].mean() if (~same[test]).any() else 0.0)
    return {
        "accuracy": float(np.mean(acc)),
        "accuracy_std": float(np.std(acc)),
        "best_threshold": float(np.mean(best)),
        "val": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
    }


def test_separable_pairs_score_one() -> None:
    gen = torch.Generator().manual_seed(1)
    e1 = torch.randn(600, 32, generator=gen)
    same = torch.arange(600) % 2 == 0
    near, far = e1 + 0.01 * torch.randn(600, 32, generator=gen), torch.randn(600, 32, generator=gen)
    e2 = torch.where(same[:, None], near, far)
    res = verification_accuracy(e1, e2, same)
    assert res["accuracy"] == 1.0 and res["accuracy_std"] == 0.0 and res["val"] == 1.0
    assert 0.0 < res["best_threshold"] < 1.0 and res["far"] < 0.01


def test_random_embeddings_score_about_half() -> None:
    gen = torch.Generator().manual_seed(2)
    res = verification_accuracy(
        torch.randn(1000, 64, generator=gen),
        torch.randn(1000, 64, generator=gen),
        torch.rand(1000, generator=gen) < 0.5,
    )
    assert 0.42 < res["accuracy"] < 0.58
    assert res["val"] < 0.05  # at FAR 1e-3 chance gives VAL ~1e-3


@pytest.mark.parametrize("n,folds", [(53, 10), (120, 10), (40, 4)])
def test_matches_brute_force(n: int, folds: int) -> None:
    rng = np.random.default_rng(n)
    same = rng.random(n) < 0.5
    # distances at grid midpoints (x.xx5), overlapping between the classes, so no pair sits on a threshold
    steps = np.where(same, rng.integers(0, 160, n), rng.integers(60, 300, n))
    dist = 0.005 + 0.01 * steps
    e1, e2 = pairs_at_distances(dist)
    got = verification_accuracy(e1, e2, torch.from_numpy(same), num_folds=folds)
    ref = brute_force(dist, same, folds, 1e-3)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert 0.6 < got["accuracy"] < 1.0  # the example is not degenerate


@pytest.mark.parametrize(
    "flipped,std", [(np.arange(0, 10), 0.3), (np.arange(50, 60), 0.3), (np.arange(0, 100, 10), 0.0)]
)
def test_folds_are_contiguous_unshuffled_and_deterministic(flipped: np.ndarray, std: float) -> None:
    # 100 pairs separable at d = 1 (same 0.5, different 1.5) except the `flipped` ones. A contiguous
    # block of 10 is one whole fold: its held-out accuracy is 0 and the nine others are 1 (std 0.3).
    # Spread one per fold, every fold scores 0.9 (std 0). Shuffled folds could give neither.
    same = np.arange(100) % 2 == 0
    dist = np.where(same, 0.5, 1.5)
    dist[flipped] = 2.0 - dist[flipped]
    e1, e2 = pairs_at_distances(dist)
    first = verification_accuracy(e1, e2, torch.from_numpy(same))
    assert first["accuracy"] == pytest.approx(0.9) and first["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert verification_accuracy(e1, e2, torch.from_numpy(same)) == first


def test_far_interpolation_follows_scipy() -> None:
    rng = np.random.default_rng(3)
    # strictly increasing FAR: identical to today's scipy interp1d
    far = np.r_[0.0, np.sort(rng.random(30))]
    thr = np.arange(31) * 0.1
    for target in (1e-3, 0.2, 0.77):
        assert _threshold_at_far(far, thr, target) == pytest.approx(float(interp1d(far, thr, kind="slinear")(target)))
    # a real FAR curve has plateaus; scipy >= 1.9 refuses it, so insightface users pin scipy 1.8.1
    neg = np.sort(rng.uniform(0.5, 3.5, 200))
    far = np.searchsorted(neg, VAL_THRESHOLDS, side="left") / 200
    with pytest.raises(ValueError, match="duplicates"):
        interp1d(far, VAL_THRESHOLDS, kind="slinear")
    old_scipy = BSpline(np.r_[far[0], far, far[-1]], VAL_THRESHOLDS, 1)
    for target in (1e-3, 0.005, 0.5, 0.99):
        assert _threshold_at_far(far, VAL_THRESHOLDS, target) == pytest.approx(float(old_scipy(target)), abs=1e-12)
    # hand example: plateaus 0 (t = 0, 1, 2) and 0.5 (t = 3, 4): target 0.25 is halfway from t = 2 to 3
    assert _threshold_at_far(np.array([0, 0, 0, 0.5, 0.5, 1]), np.arange(6.0), 0.25) == 2.5
    assert _threshold_at_far(np.array([0, 0, 0.5, 0.5, 1]), np.arange(5.0), 0.5) == 3.0  # last of the plateau
    # at the top FAR the old spline hits a zero-length last interval (BSpline gives 0.0 above); the
    # module returns the last threshold instead, the same "last of the plateau" rule
    assert _threshold_at_far(np.array([0, 0, 0.5, 0.5]), np.arange(4.0), 0.5) == 3.0
    assert _threshold_at_far(np.array([0, 0, 1e-4]), np.arange(3.0), 1e-3) == 0.0  # never reached


def test_flip_mean() -> None:
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    out = flip_mean(a, b)
    assert out.dtype == torch.float32 and torch.equal(out, (a.float() + b.float()) / 2)
    with pytest.raises(ValueError, match="emb_flipped"):
        flip_mean(a, b[:3])


def test_chests_fc_space_scores_the_flip_sum_taken_in_that_space() -> None:
    """insightface sums an image's and its mirror's embeddings in the space it scores. CHEST's h-space comes
    after the flip combination, through an FC layer with a bias: the sum gave h(x) + h(x_f) - b, another
    direction (here accuracy 0.80 against 0.83 for the flip-sum in that space); the mean gives the flip-sum's."""
    from types import SimpleNamespace

    from model.chest import ChestHead
    from model.config import ChestConfig, LossConfig
    from train.config import MetricsConfig
    from train.evaluate.protocols import score_verification

    torch.manual_seed(0)
    head = ChestHead(LossConfig(name="chest", chest=ChestConfig(hyp_dim=8)), 5, 16)
    assert head.fc is not None
    with torch.no_grad():
        head.fc.bias.normal_(0.0, 1.5)
    pairs = 200
    same = torch.arange(pairs) % 2 == 1
    x = torch.randn(2 * pairs, 16)
    x[1::2] = torch.where(same[:, None], x[0::2] + 0.8 * torch.randn(pairs, 16), x[1::2])
    x_flipped = x + 0.5 * torch.randn(2 * pairs, 16)  # a mirror's embedding lies near the image's
    issame = same.tolist()
    pair, side = torch.arange(2 * pairs) // 2, torch.arange(2 * pairs) % 2
    metrics = MetricsConfig(verification_folds=10)
    got = score_verification(SimpleNamespace(head=head), flip_mean(x, x_flipped), pair, side, issame, metrics)
    in_space = head.fc(x) + head.fc(x_flipped)
    want = verification_accuracy(in_space[0::2].detach(), in_space[1::2].detach(), torch.tensor(issame), 10)
    assert got["fc_euclidean/accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert got["fc_euclidean/val"] == pytest.approx(want["val"], abs=1e-9)


def test_bad_input_raises() -> None:
    e = torch.randn(20, 4)
    same = torch.arange(20) % 2 == 0
    cases = [
        (lambda: verification_accuracy(e, e[:19], same), "same shape"),
        (lambda: verification_accuracy(e, e, same[:19]), "issame"),
        (lambda: verification_accuracy(e[0], e[0], same), "emb1"),
        (lambda: verification_accuracy(e, e, torch.ones(20, dtype=torch.bool)), "both same and different"),
        (lambda: verification_accuracy(e, e, same.long() * 2), "issame"),
        (lambda: verification_accuracy(e, e, same, num_folds=1), "num_folds"),
        (lambda: verification_accuracy(e, e, same, num_folds=21), "num_folds"),
        (lambda: verification_accuracy(e, e, same, far_target=0.0), "far_target"),
        (lambda: verification_accuracy(e * math.nan, e, same), "NaN"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    assert verification_accuracy(e, e, same.long())["accuracy"] >= 0.5  # 0/1 integers are accepted


def test_verification_scores_each_set_of_directions_once_under_the_features_name() -> None:
    """Verification compares unit vectors, so CHEST's Poincare points (its h-features scaled along their own
    directions by expmap0) scored exactly as "fc_euclidean" under another name; the trunk's euclidean and
    cosine are one tensor. One entry per distinct direction set, named after the plain features."""
    from model.chest import ChestHead
    from model.config import ChestConfig, LossConfig
    from train.evaluate.protocols import distinct_spaces

    head = ChestHead(LossConfig(name="chest", chest=ChestConfig(hyp_dim=8)), 5, 16)
    spaces = head.embed_spaces(torch.randn(6, 16))
    assert list(spaces) == ["euclidean", "cosine", "poincare", "fc_euclidean"]
    assert list(distinct_spaces(spaces, metric_matters=False)) == ["euclidean", "fc_euclidean"]
    assert list(distinct_spaces(spaces, metric_matters=True)) == list(spaces)  # retrieval: every metric
