"""train/evaluate/retrieval.py: agreement with pytorch-metric-learning, brute force and hand examples.

faiss is not installed, so PML's AccuracyCalculator gets a torch kNN (`CustomKNN(LpDistance())`
or `CustomKNN(CosineSimilarity())`). PML ranks with torch.topk, whose order among equal scores is
unspecified (on CPU it returns e.g. [65, 68, 67, ...] for an all-zero row), while knn() ranks the
lower reference index first. So the PML comparisons are split in two:
- data whose only ties are between duplicated rows of the same label (the metric cannot depend on
  their order) against PML's own kNN;
- integer data with ties across labels against PML fed *our* kNN, which checks the MAP@R / P@1
  arithmetic and the leave-one-out bookkeeping under an identical ranking.
The tie rule itself is checked against a full stable sort and in a hand-computed example.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

import train.evaluate.retrieval as mr
from tests.test_hyperbolic import arcosh_dist64
from train.evaluate.retrieval import knn, map_at_r, pairwise_scores, precision_at_1, recall_at_k, retrieval_report

METRICS = ("euclidean", "cosine", "poincare")


def clustered(seed: int, n: int = 150, dim: int = 6, labels: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous embeddings near per-label centres (no ties), inside the c = 0.5 ball."""
    gen = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, labels, (n,), generator=gen)
    centres = torch.randn(labels, dim, generator=gen)
    x = centres[lab] + 0.8 * torch.randn(n, dim, generator=gen)
    return 0.25 * x / (1 + x.norm(dim=1, keepdim=True) / 4), lab  # norm < 1 < sqrt(2)


def tied(seed: int, metric: str, n: int = 120, labels: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy exact ties across labels; values chosen so every score is computed without rounding."""
    gen = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, labels, (n,), generator=gen)
    if metric == "cosine":  # 8 axis vectors and 16 (+-1/2)^4 vectors: unit norm, dyadic dot products
        axis = torch.cat([torch.eye(4), -torch.eye(4)])
        half = torch.tensor([[(i >> b & 1) - 0.5 for b in range(4)] for i in range(16)])
        return torch.cat([axis, half])[torch.randint(0, 24, (n,), generator=gen)], lab
    x = torch.randint(-2, 3, (n, 3), generator=gen).float()
    return (x / 8 if metric == "poincare" else x), lab


def duplicated(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous points, each repeated 1-4 times under one label: ties only within a label."""
    gen = torch.Generator().manual_seed(seed)
    base, base_lab = clustered(seed, n=45, dim=5, labels=8)
    reps = torch.randint(1, 5, (45,), generator=gen)
    x, lab = base.repeat_interleave(reps, 0), base_lab.repeat_interleave(reps)
    perm = torch.randperm(x.shape[0], generator=gen)
    return x[perm], lab[perm]


def exact_keys(q: torch.Tensor, r: torch.Tensor, metric: str) -> list[list[Any]]:
    """Exact ranking keys (larger = closer) for `tied` data, independent of the module's arithmetic."""
    if metric == "euclidean":  # integer squared distances: exact in fp64
        return (-(torch.cdist(q.double(), r.double()) ** 2)).round().tolist()
    if metric == "cosine":  # unit vectors with dyadic coordinates: exact dot products
        return (q.double() @ r.double().t()).tolist()
    # poincare, c = 1/2: -||(-q) (+) r||^2 = -||q-r||^2 / (1 - 2c<q,r> + c^2||q||^2||r||^2), as fractions
    qf = [[Fraction(float(v)) for v in row] for row in q]
    rf = [[Fraction(float(v)) for v in row] for row in r]
    half = Fraction(1, 2)

    def key(a: list[Fraction], b: list[Fraction]) -> Fraction:
        ab, aa, bb = (sum(x * y for x, y in zip(u, v)) for u, v in ((a, b), (a, a), (b, b)))
        return -(aa + bb - 2 * ab) / (1 - 2 * half * ab + half * half * aa * bb)

    return [[key(a, b) for b in rf] for a in qf]


def exact_ranking(q: torch.Tensor, r: torch.Tensor, metric: str, loo: bool) -> torch.Tensor:
    """Brute force over the whole matrix: sort by exact key, ties by lower index."""
    keys = exact_keys(q, r, metric)
    order = [
        sorted((j for j in range(len(row)) if not (loo and j == i)), key=lambda j: (-row[j], j))
        for i, row in enumerate(keys)
    ]
    return torch.tensor(order)


def fp64_ranking(q: torch.Tensor, r: torch.Tensor, metric: str, loo: bool) -> torch.Tensor:
    """Brute force for continuous data: full fp64 score matrix by independent formulas, sorted."""
    q64, r64 = q.double(), r.double()
    scores = {
        "euclidean": lambda: -torch.cdist(q64, r64),
        "cosine": lambda: (q64 / q64.norm(dim=1, keepdim=True)) @ (r64 / r64.norm(dim=1, keepdim=True)).t(),
        "poincare": lambda: -arcosh_dist64(q64, r64, 0.5),
    }[metric]()
    if loo:
        scores.fill_diagonal_(-math.inf)
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : r.shape[0] - int(loo)]


class OurKNN:
    """Our knn() behind PML's knn_func interface (distances, indices), self removed when asked."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def __call__(
        self, query: torch.Tensor, k: int, reference: torch.Tensor, ref_includes_query: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx, scores = knn(query, reference, k, self.metric, chunk=7, exclude_self=ref_includes_query)
        return -scores, idx


def pml(
    knn_func: Any, q: torch.Tensor, ql: torch.Tensor, r: torch.Tensor | None = None, rl: torch.Tensor | None = None
) -> dict[str, float]:
    calc = AccuracyCalculator(
        include=("mean_average_precision_at_r", "precision_at_1"),
        k="max_bin_count",
        knn_func=knn_func,
        device=torch.device("cpu"),
    )
    if r is None:
        return calc.get_accuracy(q, ql)  # PML's leave-one-out: reference = query, self removed
    return calc.get_accuracy(q, ql, r, rl, ref_includes_query=False)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("gallery", [False, True])
def test_matches_pml_own_knn_when_ties_stay_within_a_label(metric: str, gallery: bool) -> None:
    x, lab = duplicated(seed=1)
    # PML distances L2-normalise by default: LpDistance() alone would rank by cosine
    dist = LpDistance(normalize_embeddings=False) if metric == "euclidean" else CosineSimilarity()
    q, ql, r, rl = (x[:70], lab[:70], x[70:], lab[70:]) if gallery else (x, lab, None, None)
    ref = pml(CustomKNN(dist), q, ql, r, rl)
    assert map_at_r(q, ql, r, rl, metric=metric) == pytest.approx(ref["mean_average_precision_at_r"], rel=1e-12)
    assert precision_at_1(q, ql, r, rl, metric=metric) == pytest.approx(ref["precision_at_1"], rel=1e-12)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("gallery", [False, True])
def test_matches_pml_arithmetic_on_cross_label_ties(metric: str, gallery: bool) -> None:
    x, lab = tied(seed=2, metric=metric)
    q, ql, r, rl = (x[:50], lab[:50], x[50:], lab[50:]) if gallery else (x, lab, None, None)
    ref = pml(OurKNN(metric), q, ql, r, rl)
    assert map_at_r(q, ql, r, rl, metric=metric) == pytest.approx(ref["mean_average_precision_at_r"], rel=1e-12)
    assert precision_at_1(q, ql, r, rl, metric=metric) == pytest.approx(ref["precision_at_1"], rel=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_scores_match_fp64_formulas(metric: str) -> None:
    q, _ = clustered(seed=3, n=20)
    r, _ = clustered(seed=4, n=30)
    q64, r64 = q.double(), r.double()
    ref = {
        "euclidean": -torch.cdist(q64, r64),
        "cosine": (q64 / q64.norm(dim=1, keepdim=True)) @ (r64 / r64.norm(dim=1, keepdim=True)).t(),
        "poincare": -arcosh_dist64(q64, r64, 0.5),
    }[metric]
    got = pairwise_scores(q, r, metric)
    assert got.shape == (20, 30) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("loo", [False, True])
def test_knn_equals_exact_brute_force_under_ties_for_any_chunk(metric: str, loo: bool) -> None:
    x, _ = tied(seed=5, metric=metric)
    q, r = (x, x) if loo else (x[:40], x[40:])
    ranking = exact_ranking(q, r, metric, loo)
    for k in (1, 5, 17):
        for chunk in (1, 7, 1024):
            idx, scores = knn(q, r, k, metric, chunk=chunk, exclude_self=loo)
            assert torch.equal(idx, ranking[:, :k])
            # the scores are pairwise_scores of those pairs (up to atanh rounding for poincare)
            torch.testing.assert_close(scores, pairwise_scores(q, r, metric).gather(1, idx), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("data", ["clustered", "tied"])
def test_recall_matches_brute_force_and_ignores_chunk(metric: str, data: str) -> None:
    x, lab = clustered(seed=6) if data == "clustered" else tied(seed=6, metric=metric)
    ks = (1, 2, 4, 8)
    for loo in (True, False):
        q, ql, r, rl = (x, lab, x, lab) if loo else (x[:60], lab[:60], x[60:], lab[60:])
        ranking = (fp64_ranking if data == "clustered" else exact_ranking)(q, r, metric, loo)
        hits = rl[ranking] == ql[:, None]
        expected = {k: float(hits[:, :k].any(1).double().mean()) for k in ks}
        r_opt, rl_opt = (None, None) if loo else (r, rl)
        map_ref = map_at_r(q, ql, r_opt, rl_opt, metric=metric, chunk=1024)
        for chunk in (1, 7, 1024):
            assert recall_at_k(q, ql, r_opt, rl_opt, ks=ks, metric=metric, chunk=chunk) == expected
            assert map_at_r(q, ql, r_opt, rl_opt, metric=metric, chunk=chunk) == pytest.approx(map_ref, rel=1e-12)


def test_leave_one_out_excludes_self() -> None:
    x, _ = clustered(seed=7, n=30)
    unique = torch.arange(30)  # every label once: only the query itself could match
    assert recall_at_k(x, unique, ks=(1, 29)) == {1: 0.0, 29: 0.0}
    assert recall_at_k(x, unique, x, unique, ks=(1,)) == {1: 1.0}  # as a gallery, self is found first
    assert math.isnan(map_at_r(x, unique)) and math.isnan(precision_at_1(x, unique))  # all R = 0, as PML
    idx, _ = knn(x, x, 29, "euclidean", exclude_self=True)
    assert not (idx == torch.arange(30)[:, None]).any()
    assert torch.equal(knn(x, x, 1, "euclidean")[0][:, 0], torch.arange(30))


def test_hand_computed_leave_one_out_with_ties() -> None:
    # 1-D points x = 0, 1, 1, 3, 10 with labels A B A A B. Equal distances rank the lower index first:
    # query 0 sees (1: d1, B), (2: d1, A), (3: d3, A), (4: d10, B); query 3 sees (1: d2), (2: d2), ...
    x = torch.tensor([[0.0], [1.0], [1.0], [3.0], [10.0]])
    lab = torch.tensor([0, 1, 0, 0, 1])
    idx, _ = knn(x, x, 4, "euclidean", exclude_self=True)
    assert idx.tolist() == [[1, 2, 3, 4], [2, 0, 3, 4], [1, 0, 3, 4], [1, 2, 0, 4], [3, 1, 2, 0]]
    # R = 2, 1, 2, 2, 1. Top-R relevance: q0 [0,1] -> (1/2)(1/2); q1 [0] -> 0; q2 [0,1] -> 1/4;
    # q3 [0,1] -> 1/4; q4 [0] -> 0. MAP@R = 0.75 / 5. (Index 2 before 1 would give q0 1/2 instead.)
    assert map_at_r(x, lab) == pytest.approx(0.15, abs=1e-15)
    assert precision_at_1(x, lab) == 0.0
    # first same-label rank: q0 2, q1 4, q2 2, q3 2, q4 2
    assert recall_at_k(x, lab, ks=(1, 2, 3, 4)) == {1: 0.0, 2: 0.8, 3: 0.8, 4: 1.0}


def test_hand_computed_query_to_gallery() -> None:
    queries, q_lab = torch.tensor([[0.0], [0.5]]), torch.tensor([0, 2])  # label 2 is not in the gallery
    gallery, g_lab = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]]), torch.tensor([0, 1, 0, 0, 1])
    # query 0: R = 3, top 3 labels A B A -> (1/3)(1/1 + 2/3) = 5/9; query 1 has R = 0: skipped (as PML)
    assert map_at_r(queries, q_lab, gallery, g_lab) == pytest.approx(5 / 9, abs=1e-15)
    assert precision_at_1(queries, q_lab, gallery, g_lab) == 1.0
    assert recall_at_k(queries, q_lab, gallery, g_lab, ks=(1, 5)) == {1: 0.5, 5: 0.5}  # a lone query misses
    report = retrieval_report(queries, q_lab, (1, 5), "euclidean", ref_emb=gallery, ref_labels=g_lab)
    assert report == pytest.approx({"R@1": 0.5, "R@5": 0.5, "MAP@R": 5 / 9}, abs=1e-15)


def test_report_agrees_with_single_metrics_and_bf16_input() -> None:
    x, lab = clustered(seed=8)
    for metric in METRICS:
        report = retrieval_report(x, lab, (1, 2, 4), metric, chunk=16)
        single = recall_at_k(x, lab, ks=(1, 2, 4), metric=metric)
        expected = {**{f"R@{k}": v for k, v in single.items()}, "MAP@R": map_at_r(x, lab, metric=metric)}
        assert report == pytest.approx(expected, rel=1e-12)
    low = recall_at_k(x.bfloat16(), lab, ks=(1,))
    assert low == recall_at_k(x.bfloat16().float(), lab, ks=(1,))


def test_peak_block_is_chunk_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    x, lab = clustered(seed=9, n=100)
    shapes: list[tuple[int, int]] = []
    block = mr._ranked_block

    def spy(q: torch.Tensor, r: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        shapes.append((q.shape[0], r.shape[0]))  # the [rows, Nr] key block is the only O(N^2) object
        return block(q, r, *args)

    monkeypatch.setattr(mr, "_ranked_block", spy)
    for metric in METRICS:
        shapes.clear()
        retrieval_report(x, lab, (1, 10), metric, chunk=16)
        assert max(rows for rows, _ in shapes) == 16 and sum(rows for rows, _ in shapes) == 100


def test_bad_input_raises() -> None:
    x, lab = clustered(seed=10, n=20)
    cases = [
        (lambda: recall_at_k(x, lab[:-1]), "query_labels"),
        (lambda: map_at_r(x, lab, x[:5], lab), "ref_labels"),
        (lambda: map_at_r(x, lab, x), "both ref_emb and ref_labels"),
        (lambda: recall_at_k(x, lab, metric="manhattan"), "metric"),
        (lambda: knn(x, x, 3, "hamming"), "metric"),
        (lambda: pairwise_scores(x, x, "hamming"), "metric"),
        (lambda: pairwise_scores(x, x[:, :3], "cosine"), "dimension"),
        (lambda: recall_at_k(x, lab.float()), "integer"),
        (lambda: recall_at_k(x, lab, ks=(1, 20)), "ks"),
        (lambda: recall_at_k(x, lab, ks=(0,)), "ks"),
        (lambda: recall_at_k(x, lab, ks=()), "ks"),
        (lambda: knn(x, x, 20, "euclidean", exclude_self=True), "k="),
        (lambda: knn(x, x, 3, "euclidean", chunk=0), "chunk"),
        (lambda: knn(x, x.flip(0), 3, "euclidean", exclude_self=True), "exclude_self"),
        (lambda: knn(x * math.nan, x, 3, "euclidean"), "NaN"),
        (lambda: recall_at_k(x * 10, lab, metric="poincare"), "to_ball"),
        (lambda: recall_at_k(x, lab, metric="poincare", c=0.0), "curvature"),
        (lambda: recall_at_k(x[0], lab), "2-D"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
