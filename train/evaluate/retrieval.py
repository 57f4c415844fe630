"""Retrieval metrics (Recall@K, MAP@R, precision@1) with a chunked, memory-bounded kNN.

Owns the ranking scores of each embedding space ("euclidean", "cosine", "poincare"), the kNN with a
deterministic tie rule, and the metric definitions of the deep-metric-learning protocol
(docs/losses.md section 2.8). Pure functions of local tensors: gathering embeddings across
ranks is the caller's job (train/evaluate/protocols.py); nothing here calls torch.distributed.

Protocol:
- `ref_emb is None`: leave-one-out over the query set (CUB, Cars, SOP); each query's own row is
  excluded. Otherwise query -> gallery (In-shop).
- Recall@K: fraction of *all* queries with a same-label item in the top K (a query whose label is
  absent from the references counts as a miss).
- MAP@R and precision@1: the pytorch-metric-learning definitions (Musgrave et al. 2020); queries
  with no same-label reference (R = 0) are skipped, and the result is NaN when every query is.

Ties: neighbours are ranked by a key in the same order as `pairwise_scores` (squared distance,
cosine, squared Moebius norm; see `_ranked_block`); equal keys rank the lower reference index
first, whatever torch.topk returns. Rankings are exactly independent of `chunk` when the GEMM is
(always, for exactly representable inputs); otherwise BLAS may round a row differently per block
height, ~1e-7 relative, which can only swap neighbours that close.

Memory: queries are processed `chunk` rows at a time, so peak memory is O(chunk * Nr), never
Nq * Nr: one fp32 [chunk, Nr] key block plus a few temporaries of that size (up to ~5 for the
Poincare Gram form; tie resolution adds bool and int64 blocks for rows with ties at the k-th
place). With chunk=1024 and SOP's Nr = 60,502 one block is 248 MB: budget about 1.5 GB, or lower
`chunk`. The kNN output itself is [chunk, k]; metrics are accumulated per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.hyperbolic import dist_from_gram, mobius_diff_sq_norm, pairwise_dist

METRICS = ("euclidean", "cosine", "poincare")
BALL_TOL = 1e-5  # c ||x||^2 may exceed 1 by rounding after expmap0 in fp32; beyond this it is user error


def _as_float(name: str, emb: torch.Tensor) -> torch.Tensor:
    """Validate an [N, D] embedding and promote it to at least fp32 (bf16/fp16 rank poorly)."""
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor [N, D]; got {getattr(emb, 'shape', type(emb))}")
    if not emb.is_floating_point():
        raise ValueError(f"{name} must be floating point; got {emb.dtype} (cast with .float())")
    return emb.to(torch.promote_types(emb.dtype, torch.float32))


def pairwise_scores(query: torch.Tensor, ref: torch.Tensor, metric: str, c: float = 0.5) -> torch.Tensor:
    """Similarity scores [Nq, Nr], larger = closer, computed in fp32 (fp64 stays fp64, except poincare).

    euclidean: -||q - r|| by the Gram form; cosine: cosine similarity; poincare:
    -model.hyperbolic.pairwise_dist(q, r, c) (always fp32; the points must lie in the ball).
    """
    q, r = _as_float("query", query), _as_float("ref", ref)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query and ref must have the same dimension; got {q.shape[1]} and {r.shape[1]}")
    if metric == "euclidean":
        return -_sq_euclidean(q, r).sqrt()
    if metric == "cosine":
        return F.normalize(q, dim=1) @ F.normalize(r, dim=1).t()
    if metric == "poincare":
        return -pairwise_dist(q, r, c)
    raise ValueError(f"metric={metric!r} is unknown; use one of {METRICS}")


def _sq_euclidean(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """||q - r||^2 by one GEMM plus norms; clamped because rounding can make it slightly negative."""
    return ((q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * (q @ r.t())).clamp_min(0.0)


def _check_ball(name: str, emb: torch.Tensor, c: float) -> None:
    """Raw Euclidean features passed to the Poincare metric would give clamped, meaningless scores."""
    if not c > 0:
        raise ValueError(f"curvature c={c} must be > 0 for metric='poincare'")
    if emb.shape[0] and float((c * (emb.float() ** 2).sum(1)).max()) > 1.0 + BALL_TOL:
        raise ValueError(
            f"{name} has rows outside the Poincare ball of curvature -{c} (c ||x||^2 >= 1); "
            "map features with model.hyperbolic.to_ball first"
        )


def _topk_low_index(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k columns per row, best first, equal keys by lower column index (torch.topk's own tie
    order is unspecified: on CPU an all-equal row comes back as e.g. [65, 68, 67, 66, 69])."""
    vals, idx = torch.topk(keys, k, dim=1)
    kth = vals[:, -1:]
    # Rows with more than k keys >= the k-th value have a tie at the cut: topk may have kept any
    # of the tied columns, so re-select those rows exactly (rare on real data, all rows if collapsed).
    boundary = ((keys >= kth).sum(1) > k).nonzero().squeeze(1)
    if boundary.numel():
        sub, cut = keys[boundary], kth[boundary]
        above = sub > cut
        tied = sub == cut
        room = k - above.sum(1, keepdim=True)
        keep = above | (tied & (tied.cumsum(1) <= room))
        # nonzero() walks rows in order and columns ascending; exactly k per row by construction
        idx[boundary] = keep.nonzero()[:, 1].view(-1, k)
    # final order: key descending, ties by ascending index (stable sort of index-sorted columns)
    idx = idx.sort(dim=1).values
    perm = keys.gather(1, idx).sort(dim=1, descending=True, stable=True).indices
    return idx.gather(1, perm)


def _ranked_block(
    q: torch.Tensor, r: torch.Tensor, k: int, metric: str, c: float, self_offset: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (indices, pairwise_scores values) of one query block.

    Ranking uses a key in the same order as the score but taken before its last monotone map:
    sqrt (euclidean) can merge distinct squared distances, and artanh (poincare) is a vectorised
    kernel whose SIMD body and scalar tail round differently, so a score's last bit depends on its
    position in the block, i.e. on `chunk` and the thread count (measured: 189 of 1000 atanh
    values change between chunkings), and equal distances could stop tying. The keys use only
    correctly rounded + - * /, so ties and rankings are exactly chunk-independent, up to the GEMM,
    which BLAS may round per block height (~1e-7 relative: only neighbours that close can swap).
    """
    if metric == "poincare":  # fp32 like model.hyperbolic; key = -||(-q) (+)_c r||^2, same Gram form
        q, r = q.float(), r.float()
        qq, rr, uv = (q * q).sum(1)[:, None], (r * r).sum(1), q @ r.t()
        keys = -mobius_diff_sq_norm(qq, rr[None, :], uv, c)
        idx = _topk_low_index(_mask_self(keys, self_offset), k)
        return idx, -dist_from_gram(qq, rr[idx], uv.gather(1, idx), c)
    if metric == "euclidean":
        keys = -_sq_euclidean(q, r)
        idx = _topk_low_index(_mask_self(keys, self_offset), k)
        return idx, -(-keys.gather(1, idx)).sqrt()
    keys = pairwise_scores(q, r, metric)
    idx = _topk_low_index(_mask_self(keys, self_offset), k)
    return idx, keys.gather(1, idx)


def _mask_self(keys: torch.Tensor, self_offset: int | None) -> torch.Tensor:
    """Leave-one-out: row i of this block is reference self_offset + i; it can never be retrieved."""
    if self_offset is not None:
        rows = torch.arange(keys.shape[0], device=keys.device)
        keys[rows, rows + self_offset] = -math.inf
    return keys


def _knn_chunks(
    q: torch.Tensor, r: torch.Tensor, k: int, metric: str, c: float, chunk: int, exclude_self: bool
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yields (start, indices [n, k], scores [n, k]) per query chunk; inputs already validated."""
    for start in range(0, q.shape[0], chunk):
        idx, vals = _ranked_block(q[start : start + chunk], r, k, metric, c, start if exclude_self else None)
        yield start, idx, vals


def _check_knn_args(
    q: torch.Tensor, r: torch.Tensor, k: int, metric: str, c: float, chunk: int, exclude_self: bool
) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; use one of {METRICS}")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query and ref must have the same dimension; got {q.shape[1]} and {r.shape[1]}")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk={chunk!r} must be a positive int (query rows per block)")
    available = r.shape[0] - int(exclude_self)
    if not (isinstance(k, int) and 1 <= k <= available):
        raise ValueError(
            f"k={k!r} must be an int in [1, {available}] (the number of references"
            f"{' other than the query itself' if exclude_self else ''}); lower k"
        )
    if exclude_self and not (q.shape == r.shape and torch.equal(q, r)):
        raise ValueError(
            "exclude_self=True needs ref to be the query set itself (row i of both is the same "
            "item); pass ref=query or use exclude_self=False"
        )
    for name, emb in (("query", q), ("ref", r)):
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{name} has NaN or inf entries; check the model output before evaluating")
    if metric == "poincare":
        _check_ball("query", q, c)
        _check_ball("ref", r, c)


@torch.no_grad()
def knn(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    metric: str,
    c: float = 0.5,
    chunk: int = 1024,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k reference indices [Nq, k] (int64) and their scores [Nq, k], best first.

    Processed in query chunks (peak memory O(chunk * Nr)). `exclude_self`: leave-one-out, query i
    is ref i and its own column is masked. Equal distances rank the lower reference index first.
    """
    q, r = _as_float("query", query), _as_float("ref", ref)
    _check_knn_args(q, r, k, metric, c, chunk, exclude_self)
    parts = list(_knn_chunks(q, r, k, metric, c, chunk, exclude_self))
    if not parts:
        return torch.zeros((0, k), dtype=torch.long, device=q.device), q.new_zeros((0, k))
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _resolve(
    query_emb: torch.Tensor, query_labels: torch.Tensor, ref_emb: torch.Tensor | None, ref_labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(query, query labels, ref, ref labels, leave_one_out) after validation."""
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("pass both ref_emb and ref_labels (query -> gallery) or neither (leave-one-out)")
    q = _as_float("query_emb", query_emb)
    ql = _check_labels("query_labels", query_labels, q.shape[0]).to(q.device)
    if ref_emb is None or ref_labels is None:
        return q, ql, q, ql, True
    r = _as_float("ref_emb", ref_emb)
    rl = _check_labels("ref_labels", ref_labels, r.shape[0]).to(q.device)
    return q, ql, r.to(q.device), rl, False


def _check_labels(name: str, labels: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor; got {getattr(labels, 'shape', type(labels))}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer class ids; got {labels.dtype} (cast with .long())")
    if labels.shape[0] != n:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but its embeddings have {n} rows; pass one label per embedding row"
        )
    return labels.long()  # one dtype for unique/searchsorted/==, whatever the caller used


def _same_label_counts(ql: torch.Tensor, rl: torch.Tensor, leave_one_out: bool) -> torch.Tensor:
    """R per query: references sharing its label (minus the query itself in leave-one-out)."""
    uniq, counts = torch.unique(rl, return_counts=True)
    if uniq.numel() == 0:
        return torch.zeros_like(ql)
    pos = torch.searchsorted(uniq, ql).clamp_max(uniq.numel() - 1)
    return torch.where(uniq[pos] == ql, counts[pos], 0) - int(leave_one_out)


@torch.no_grad()  # evaluation only: no autograd graph over the [chunk, Nr] blocks
def _evaluate(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    ref_emb: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    ks: Sequence[int],
    want_map: bool,
    metric: str,
    c: float,
    chunk: int,
) -> dict[str, float]:
    """One chunked kNN pass accumulating Recall@k (for ks), MAP@R and P@1 (if want_map)."""
    q, ql, r, rl, loo = _resolve(query_emb, query_labels, ref_emb, ref_labels)
    ks = list(ks)
    if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
        raise ValueError(f"ks={ks!r} must be a non-empty list of positive ints, e.g. (1, 2, 4)")
    if max(ks) > r.shape[0] - int(loo):
        raise ValueError(
            f"ks={ks!r} asks for more neighbours than the {r.shape[0] - int(loo)} references; "
            "drop the large K values for this evaluation set"
        )
    r_count = _same_label_counts(ql, rl, loo)
    valid = r_count > 0
    k = max(ks + ([int(r_count.max())] if want_map and bool(valid.any()) else []) + [1])
    hits = {kk: 0 for kk in ks}
    ap_sum, p1_sum = 0.0, 0.0
    _check_knn_args(q, r, k, metric, c, chunk, loo)
    for start, idx, _ in _knn_chunks(q, r, k, metric, c, chunk, loo):
        lab = ql[start : start + idx.shape[0]]
        rel = rl[idx] == lab[:, None]
        found = rel.cummax(dim=1).values  # found[:, j]: a same-label item within the top j + 1
        for kk in ks:
            hits[kk] += int(found[:, kk - 1].sum())
        if want_map:
            rc, ok = r_count[start : start + idx.shape[0]], valid[start : start + idx.shape[0]]
            ranks = torch.arange(1, k + 1, device=idx.device)
            rel_r = rel & (ranks[None, :] <= rc[:, None])  # only the first R ranks count
            prec = rel_r.cumsum(1).double() / ranks  # P@j
            ap = (prec * rel_r).sum(1) / rc.clamp_min(1)
            ap_sum += float(ap[ok].sum())
            p1_sum += float(rel[ok, 0].sum())
    n_q, n_valid = q.shape[0], int(valid.sum())
    out = {f"R@{kk}": hits[kk] / n_q if n_q else math.nan for kk in ks}
    if want_map:
        out["MAP@R"] = ap_sum / n_valid if n_valid else math.nan
        out["P@1"] = p1_sum / n_valid if n_valid else math.nan
    return out


def recall_at_k(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 2, 4),
    metric: str = "euclidean",
    c: float = 0.5,
    chunk: int = 1024,
) -> dict[int, float]:
    """{K: Recall@K}: fraction of queries with at least one same-label reference in the top K."""
    res = _evaluate(query_emb, query_labels, ref_emb, ref_labels, ks, False, metric, c, chunk)
    return {kk: res[f"R@{kk}"] for kk in ks}


def map_at_r(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    metric: str = "euclidean",
    c: float = 0.5,
    chunk: int = 1024,
) -> float:
    """MAP@R: mean over queries with R > 0 of (1/R) sum_{j<=R} P@j [j-th neighbour relevant]."""
    return _evaluate(query_emb, query_labels, ref_emb, ref_labels, (1,), True, metric, c, chunk)["MAP@R"]


def precision_at_1(
    query_emb: torch.Tensor,
    query_labels: torch.Tensor,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    metric: str = "euclidean",
    c: float = 0.5,
    chunk: int = 1024,
) -> float:
    """Precision@1 over queries with R > 0 (pytorch-metric-learning's definition)."""
    return _evaluate(query_emb, query_labels, ref_emb, ref_labels, (1,), True, metric, c, chunk)["P@1"]


def retrieval_report(
    emb: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int],
    metric: str,
    c: float = 0.5,
    chunk: int = 1024,
    ref_emb: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """{"R@1": .., "R@2": .., "MAP@R": ..} from a single kNN pass, for logging."""
    res = _evaluate(emb, labels, ref_emb, ref_labels, ks, True, metric, c, chunk)
    return {key: val for key, val in res.items() if key != "P@1"}
