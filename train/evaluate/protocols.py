"""Scoring an evaluation set by its protocol (train/evaluate/sets.py), in training and from the CLI.

Every rank embeds its share of the set's shards; the embeddings are gathered so that every rank holds
the whole set. Class predictions run chunk by chunk through the class-sharded reduction (the table
stays sharded); retrieval and verification metrics are computed identically on every rank, in query
blocks. Each embedding space the head offers is scored: "euclidean" and "cosine" (the embedding),
and for CHEST "poincare" (x^H in the ball) and "fc_euclidean" (h(x^E), the eta_H = 0 ablation's space).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from data.config import DataConfig
from data.shards import split_entry
from data.stream import build_eval_loader
from model.task import MetricLearningTask
from train.config import MetricsConfig
from train.dist import all_gather_variable
from train.evaluate.retrieval import retrieval_report
from train.evaluate.sets import EvalSet
from train.evaluate.verification import flip_mean, verification_accuracy

ModelInput = Callable[[torch.Tensor], torch.Tensor]
# bookkeeping and lower-is-better values: never "best"
NOT_SCORES = frozenset(
    {
        "num_samples",
        "skipped_samples",
        "nonfinite_embeddings",
        "num_gallery",
        "num_pairs",
        "accuracy_std",
        "val_std",
        "far",
        "best_threshold",
    }
)


def metric_of(space: str) -> str:
    """The retrieval metric of an embedding space (train/evaluate/retrieval.py's names)."""
    return "poincare" if space == "poincare" else "cosine" if space.endswith("cosine") else "euclidean"


@torch.no_grad()
def embed_loader(
    task: MetricLearningTask,
    loader: Iterable,
    device: torch.device,
    model_input: ModelInput,
    flip: bool = False,
    side_of_key: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(embeddings, labels, sides) of the whole split on every rank, in rank order.

    `flip`: the mean of each image's embedding and its horizontal mirror's (insightface's flip-sum, halved).
    `side_of_key`: the loader yields keys `<stem>_<pair>_<side>`; their side (0/1) comes back too.
    """
    embs, labels, sides = [], [], []
    for batch in _in_lockstep(loader, device) if _forwards_are_collective(task) else loader:
        images = batch[0]
        x = model_input(images)
        emb = task.embed(x)
        if flip:
            emb = flip_mean(emb, task.embed(torch.flip(x, dims=[-1])))
        if len(batch) == 1:  # a stand-in (see _in_lockstep): its forward only took part in the gathers
            continue
        y = batch[1]
        embs.append(emb)
        labels.append(y.to(device))
        if side_of_key:
            sides.append(torch.tensor([int(key.rsplit("_", 1)[-1]) for key in batch[2]], device=device))
    emb_all = torch.cat(embs) if embs else torch.zeros((0, task.head.embed_dim), device=device)
    lab_all = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.long, device=device)
    side_all = None
    if side_of_key:
        side_all = all_gather_variable(
            torch.cat(sides) if sides else torch.zeros((0,), dtype=torch.long, device=device)
        )
    return all_gather_variable(emb_all), all_gather_variable(lab_all), side_all


def _forwards_are_collective(task: MetricLearningTask) -> bool:
    """True under ZeRO-3 on several ranks: each trunk forward gathers its parameters from every rank."""
    stage = getattr(task.backbone, "zero_optimization_stage", None)  # a DeepSpeed engine's (training)
    return callable(stage) and stage() == 3 and dist.is_initialized() and dist.get_world_size() > 1


_DTYPES = (torch.uint8, torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _in_lockstep(loader: Iterable, device: torch.device) -> Iterator[tuple]:
    """The loader's batches, then stand-ins `(images,)` until every rank's loader is done.

    ZeRO-3 gathers the trunk's partitions from all ranks in every forward, so all ranks must run the same
    number of forwards; eval shards are dealt whole to ranks and workers, so their batch counts differ (a
    rank may get none), and a rank that stopped early left the others waiting in a gather for ever. Each
    step agrees (MAX over ranks) on whether any rank still has a batch, and on its image shape and dtype.
    """
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        state = torch.zeros(6, dtype=torch.int64, device=device)  # [has a batch, C, H, W, dtype index + 1, size]
        if batch is not None:
            images = batch[0]
            state[0], state[4], state[5] = 1, _DTYPES.index(images.dtype) + 1, images.shape[0]
            state[1 : 1 + images.dim() - 1] = torch.tensor(images.shape[1:4])
        dist.all_reduce(state, op=dist.ReduceOp.MAX)
        if batch is not None:
            yield batch
        elif int(state[0]):
            shape = [int(n) for n in state[1:4] if int(n)]
            # the largest batch's size: a compiled trunk has a graph for it (one image would compile another)
            yield (torch.zeros((int(state[5]), *shape), dtype=_DTYPES[int(state[4]) - 1]),)
        else:
            return


def distinct_spaces(spaces: dict[str, torch.Tensor], metric_matters: bool) -> dict[str, torch.Tensor]:
    """Spaces to score; where the metric does not matter (verification compares unit vectors, insightface's
    protocol), one per distinct set of directions: CHEST's Poincare points are its h-features scaled along
    their own directions (expmap0), so they would score exactly as "fc_euclidean" under another name."""
    if metric_matters:
        return spaces
    out: dict[str, torch.Tensor] = {}
    # a ball's points last: of two spaces with one direction set, the name of the plain features is kept
    for name, points in sorted(spaces.items(), key=lambda item: metric_of(item[0]) == "poincare"):
        unit = torch.nn.functional.normalize(points.float(), dim=1)
        if not any(
            kept.shape == points.shape
            and torch.allclose(unit, torch.nn.functional.normalize(kept.float(), dim=1), atol=1e-5)
            for kept in out.values()
        ):
            out[name] = points
    return out


def score_classes(
    task: MetricLearningTask, emb: torch.Tensor, lab: torch.Tensor, chunk: int = 4096
) -> dict[str, float]:
    """acc_<rule> for each of the head's prediction rules (acc_measure, acc_cosine, acc_poincare, ...)."""
    correct: dict[str, int] = {}
    for start in range(0, emb.shape[0], chunk):
        for rule, pred in task.head.predict(emb[start : start + chunk]).items():
            correct[rule] = correct.get(rule, 0) + int((pred == lab[start : start + chunk]).sum())
    return {f"acc_{rule}": hits / max(emb.shape[0], 1) for rule, hits in correct.items()}


def score_retrieval(
    task: MetricLearningTask,
    emb: torch.Tensor,
    lab: torch.Tensor,
    ks: tuple[int, ...],
    chunk: int,
    ref: torch.Tensor | None = None,
    ref_lab: torch.Tensor | None = None,
) -> dict[str, float]:
    """<space>/R@k and <space>/MAP@R: leave-one-out, or query -> gallery when `ref` is given."""
    curvature = task.head.cfg.chest.curvature
    out: dict[str, float] = {}
    queries = task.head.embed_spaces(emb)
    refs = task.head.embed_spaces(ref) if ref is not None else {}
    for space, points in queries.items():
        report = retrieval_report(
            points, lab, ks, metric_of(space), c=curvature, chunk=chunk, ref_emb=refs.get(space), ref_labels=ref_lab
        )
        out.update({f"{space}/{key}": value for key, value in report.items()})
    return out


def score_verification(
    task: MetricLearningTask,
    emb: torch.Tensor,
    pair: torch.Tensor,
    side: torch.Tensor,
    issame: list[bool],
    metrics: MetricsConfig,
) -> dict[str, float]:
    """<space>/accuracy (+- accuracy_std), val at metrics.far_target, ... of the pairs whose two images
    both decoded (a pair that lost an image is left out and counted: num_pairs)."""
    order = torch.argsort(pair * 2 + side)
    pair, side = pair[order], side[order]
    both = torch.zeros(len(issame), dtype=torch.long, device=pair.device).index_add_(0, pair, torch.ones_like(pair))
    complete = both == 2
    keep = complete[pair]
    first, second = order[keep & (side == 0)], order[keep & (side == 1)]
    same = torch.tensor(issame, dtype=torch.bool)[complete.cpu()]
    out: dict[str, float] = {"num_pairs": float(int(complete.sum()))}
    spaces = distinct_spaces(task.head.embed_spaces(emb), metric_matters=False)
    for space, points in spaces.items():
        scores = verification_accuracy(
            points[first].cpu(),
            points[second].cpu(),
            same,
            num_folds=metrics.verification_folds,
            far_target=metrics.far_target,
        )
        out.update({f"{space}/{key}": value for key, value in scores.items()})
    return out


def nonfinite_rows(emb: torch.Tensor) -> torch.Tensor:
    """Which embeddings hold NaN or inf. A training run's evaluation scores the others and says so, instead of
    raising (a diverging model, or one image that overflows in bf16, would end the job, and its resumed
    successor would evaluate and end again)."""
    return ~torch.isfinite(emb).all(dim=1)


def evaluate_set(
    eval_set: EvalSet,
    task: MetricLearningTask,
    data: DataConfig,
    metrics: MetricsConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    model_input: ModelInput,
    on_embeddings: Callable[[dict[str, torch.Tensor], torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """The set's scalars (unprefixed) by its protocol; collective: every rank must call it."""
    cfg = eval_set.data_config(data)
    verification = eval_set.protocol == "verification"
    loader = build_eval_loader(cfg, rank, world_size, with_keys=verification)
    emb, lab, side = embed_loader(task, loader, device, model_input, flip=verification, side_of_key=verification)
    bad = nonfinite_rows(emb)
    nonfinite = int(bad.sum())
    emb, lab, side = emb[~bad], lab[~bad], None if side is None else side[~bad]
    if on_embeddings is not None and emb.shape[0]:
        on_embeddings(task.head.embed_spaces(emb), lab)
    # samples that did not decode are skipped (and warned about by the reader); say how many the set lost
    expected = int(split_entry(eval_set.root, eval_set.split).get("num_samples", emb.shape[0]))
    read = emb.shape[0] + nonfinite
    out: dict[str, float] = {
        "num_samples": float(emb.shape[0]),
        "skipped_samples": float(expected - read),
        "nonfinite_embeddings": float(nonfinite),
    }
    if expected != read and rank == 0:
        print(
            f"warning: {eval_set.name}: {expected - read} of {expected} samples were skipped as bad "
            f"(see the reader's warnings); the scores cover the other {read}",
            flush=True,
        )
    if nonfinite and rank == 0:
        print(
            f"warning: {eval_set.name}: the model gave {nonfinite} of {read} images a NaN or inf embedding (has "
            f"the training diverged?); they are left out of the scores, which cover the other {emb.shape[0]}",
            flush=True,
        )
    if nonfinite and emb.shape[0] <= max(eval_set.ks, default=1):
        return out  # too few finite embeddings to score
    if eval_set.protocol == "classification":
        out.update(score_classes(task, emb, lab))
        if metrics.retrieval and emb.shape[0] > 1:
            out.update(score_retrieval(task, emb, lab, eval_set.ks, metrics.retrieval_chunk))
    elif eval_set.protocol == "retrieval":
        out.update(score_retrieval(task, emb, lab, eval_set.ks, metrics.retrieval_chunk))
    elif eval_set.protocol == "query_gallery":
        gallery = build_eval_loader(eval_set.data_config(data, eval_set.gallery_split), rank, world_size)
        gal, gal_lab, _ = embed_loader(task, gallery, device, model_input)
        bad = nonfinite_rows(gal)
        gal, gal_lab = gal[~bad], gal_lab[~bad]
        out["num_gallery"] = float(gal.shape[0])
        out["nonfinite_embeddings"] += float(bad.sum())
        lost = int(split_entry(eval_set.root, eval_set.gallery_split).get("num_samples", gal.shape[0]))
        lost -= gal.shape[0] + int(bad.sum())
        out["skipped_samples"] += float(lost)  # the query's and the gallery's
        if lost and rank == 0:
            print(f"warning: {eval_set.name}: {lost} gallery samples were skipped as bad", flush=True)
        out.update(score_retrieval(task, emb, lab, eval_set.ks, metrics.retrieval_chunk, gal, gal_lab))
    else:
        assert side is not None
        issame = split_entry(eval_set.root, eval_set.split)["issame"]
        out.update(score_verification(task, emb, lab, side, issame, metrics))
    return out


def evaluate_sets(
    sets: list[EvalSet],
    task: MetricLearningTask,
    data: DataConfig,
    metrics: MetricsConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    model_input: ModelInput,
    on_embeddings: Callable[[dict[str, torch.Tensor], torch.Tensor], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[dict[str, float]] | None:
    """Every set's scalars (unprefixed, in the order of `sets`); collective. Pictures of the first set.

    `stop` (collective, e.g. a training run's agreed stop signal) is asked before each set after the first:
    True ends the evaluation there and returns None, so a job warned of its end stops within one set's time.
    """
    per_set = []
    for i, eval_set in enumerate(sets):
        if i and stop is not None and stop():
            return None
        per_set.append(
            evaluate_set(
                eval_set, task, data, metrics, rank, world_size, device, model_input, on_embeddings if i == 0 else None
            )
        )
    return per_set


def flatten(sets: list[EvalSet], per_set: list[dict[str, float]]) -> dict[str, float]:
    """One dict for logging: each set's scalars under its prefix (the primary set's unprefixed)."""
    return {
        f"{eval_set.prefix}{key}": value for eval_set, values in zip(sets, per_set) for key, value in values.items()
    }


def update_best(best: dict[str, float], values: dict[str, float]) -> dict[str, float]:
    """The best (largest) value so far of every score in `values` (in place; returned for chaining)."""
    for key, value in values.items():
        if key.rsplit("/", 1)[-1] not in NOT_SCORES and math.isfinite(value):
            best[key] = max(best.get(key, -math.inf), value)
    return best


def protocol_rows(eval_set: EvalSet, values: dict[str, float]) -> list[str]:
    """The papers' table row(s) of a set, in percent: one line per embedding space."""

    def pct(key: str) -> str:
        return f"{100 * values[key]:.2f}" if key in values else "-"

    title = f"{eval_set.name} ({eval_set.protocol}"
    title += f", {int(values.get('num_samples', 0))} images" + (
        f" vs {int(values['num_gallery'])} gallery)" if "num_gallery" in values else ")"
    )
    if eval_set.protocol == "classification":
        rules = [k for k in values if k.startswith("acc_")]
        rows = [f"{title}: top-1 " + ", ".join(f"{k[4:]} {pct(k)}" for k in rules)]
        spaces = sorted({k.split("/")[0] for k in values if k.endswith("/MAP@R")})
    elif eval_set.protocol == "verification":
        spaces = sorted({k.split("/")[0] for k in values if k.endswith("/accuracy")})
        return [
            f"{title}, {int(values.get('num_pairs', 0))} pairs, {s}: accuracy {pct(s + '/accuracy')} "
            f"+- {pct(s + '/accuracy_std')}, VAL {pct(s + '/val')} @ FAR {values.get(s + '/far', 0):.2g}"
            for s in spaces
        ]
    else:
        rows = []
        spaces = sorted({k.split("/")[0] for k in values if k.endswith("/MAP@R")})
    for space in spaces:
        cols = [f"R@{k}" for k in eval_set.ks] + ["MAP@R"]
        rows.append(f"{title}, {space}: " + " / ".join(cols) + " = " + " / ".join(pct(f"{space}/{c}") for c in cols))
    return rows
