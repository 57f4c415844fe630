"""Held-out evaluation: classification accuracy by each of the head's prediction rules and, when asked,
retrieval (Recall@K, MAP@R) in each of its embedding spaces.

Every rank embeds its share of the evaluation set; the embeddings are gathered so that every rank
holds the whole set. Class predictions run chunk by chunk through the class-sharded reduction (the
table stays sharded); retrieval metrics are computed identically on every rank, in query blocks.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from model.task import MetricLearningTask
from train.config import MetricsConfig
from train.dist import all_gather_variable
from train.metrics_retrieval import retrieval_report


@torch.no_grad()
def gather_embeddings(task: MetricLearningTask, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      device: torch.device, model_input: Callable[[torch.Tensor], torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels of the whole evaluation set, on every rank (rank order).

    `model_input` turns a loader's images into the backbone's input (Trainer.model_input).
    """
    embs, labels = [], []
    for images, y in loader:
        embs.append(task.embed(model_input(images)))
        labels.append(y.to(device))
    emb = torch.cat(embs) if embs else torch.zeros((0, task.head.embed_dim), device=device)
    lab = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.long, device=device)
    return all_gather_variable(emb), all_gather_variable(lab)


@torch.no_grad()
def evaluate(task: MetricLearningTask, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             model_input: Callable[[torch.Tensor], torch.Tensor], cfg: MetricsConfig, chunk: int = 4096,
             on_embeddings: Callable[[dict[str, torch.Tensor], torch.Tensor], None] | None = None
             ) -> dict[str, float]:
    """Scalars named acc_<rule> (e.g. acc_measure, acc_cosine) and <space>/R@k, <space>/MAP@R.

    `on_embeddings(spaces, labels)` receives the gathered evaluation embeddings (for pictures).
    """
    emb, lab = gather_embeddings(task, loader, device, model_input)
    if on_embeddings is not None and emb.shape[0]:
        on_embeddings(task.head.embed_spaces(emb), lab)
    correct: dict[str, int] = {}
    for start in range(0, emb.shape[0], chunk):
        for rule, pred in task.head.predict(emb[start:start + chunk]).items():
            correct[rule] = correct.get(rule, 0) + int((pred == lab[start:start + chunk]).sum())
    n = emb.shape[0]
    out = {f"acc_{rule}": hits / max(n, 1) for rule, hits in correct.items()}
    out["num_samples"] = float(n)
    if cfg.retrieval and n > 1:
        curvature = task.head.cfg.chest.curvature
        for space, points in task.head.embed_spaces(emb).items():
            report = retrieval_report(points, lab, cfg.ks, space, c=curvature, chunk=cfg.retrieval_chunk)
            out.update({f"{space}/{key}": value for key, value in report.items()})
    return out
