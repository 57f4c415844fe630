"""Held-out classification accuracy with DistArc's predictive measure and with cosine argmax.

Every rank embeds its share of the evaluation set; the embeddings are gathered so that every rank
holds the whole set, then the class-sharded argmin runs chunk by chunk (the table stays sharded).
"""
from __future__ import annotations

from typing import Iterable

import torch

from model.task import MetricLearningTask
from train.dist import all_gather_variable


@torch.no_grad()
def evaluate_classification(task: MetricLearningTask, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                            device: torch.device, input_dtype: torch.dtype, chunk: int = 4096) -> dict[str, float]:
    """Accuracy of both predictions over the whole held-out set (same result on every rank)."""
    embs, labels = [], []
    for images, y in loader:
        embs.append(task.embed(images.to(device, input_dtype)))
        labels.append(y.to(device))
    dim = task.head.embed_dim
    emb = torch.cat(embs) if embs else torch.zeros((0, dim), device=device)
    lab = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.long, device=device)
    emb, lab = all_gather_variable(emb), all_gather_variable(lab)
    correct = {"measure": 0, "cosine": 0}
    for start in range(0, emb.shape[0], chunk):
        pred = task.head.predict(emb[start:start + chunk])
        for key in correct:
            correct[key] += int((pred[key] == lab[start:start + chunk]).sum())
    n = max(emb.shape[0], 1)
    return {"acc_measure": correct["measure"] / n, "acc_cosine": correct["cosine"] / n,
            "num_samples": float(emb.shape[0])}
