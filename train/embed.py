"""Embeddings of a trained run for downstream use.

  python -m train.embed RUN_DIR --shards ROOT [--split S] --out emb.pt [--space poincare]
  python -m train.embed RUN_DIR --images DIR_OR_FILES... --out emb.pt [--checkpoint step-N | --export]

writes {"embeddings" [N, D] fp32, "keys" (sample keys or file paths), "labels" [N] (shards only),
"skipped" (images only: the files that do not decode, with why), "space", "source", "step"} with torch.save,
atomically. From Python, `load_embedder(run_dir)` returns a ready
module (eval mode) with the run's own eval transform:

    embedder = load_embedder("runs/vits_sop_chest", space="poincare")
    emb = embedder(torch.stack([embedder.transform(Image.open(p)) for p in paths]))
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable

import torch
from PIL import Image
from torch import nn

from common.files import write_file_atomic
from data.stream import build_eval_loader
from data.transforms import InputNormaliser, build_transform, decode_image, to_mode
from model.backbone import EmbeddingModel
from model.proxies import ShardedHead
from train.evaluate.sets import EvalSet, make_set
from train.evaluate.standalone import LoadedRun, build_embedding_model, build_sharded_head, load_run

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Embedder(nn.Module):
    """Normalised images [B, C, H, W] -> embeddings in one of the head's spaces; `transform` maps a PIL
    image to the model's input [C, H, W] exactly as evaluation does (resize/crop, normalisation)."""

    def __init__(
        self,
        model: EmbeddingModel,
        head: ShardedHead | None,
        space: str,
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        super().__init__()
        self.model, self.head, self.space, self.transform = model, head, space, transform

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.model(images).float()
        if self.head is None:  # the trunk's own space; "cosine" compares directions, so unit vectors
            return torch.nn.functional.normalize(emb, dim=1) if self.space == "cosine" else emb
        return self.head.embed_spaces(emb)[self.space]


def embedder_of(run: LoadedRun, space: str = "euclidean", device: str | torch.device = "cpu") -> Embedder:
    device = torch.device(device)
    model = build_embedding_model(run, device)
    head = None
    if space not in ("euclidean", "cosine"):
        head = build_sharded_head(run, 0, 1, device)
        probe = head.embed_spaces(torch.zeros(1, run.cfg.model.embed_dim, device=device))
        if space not in probe:
            raise ValueError(f"space={space!r}: the {run.cfg.loss.name} head offers {sorted(probe)}")
    eval_transform = build_transform(run.cfg.data, train=False)
    normaliser = InputNormaliser(run.cfg.data)

    def transform(image: Image.Image) -> torch.Tensor:
        image = to_mode(image, run.cfg.data.in_chans)  # as training decodes (convert clips 16-bit at 255)
        return normaliser(eval_transform(image)[None], torch.device("cpu"), torch.float32)[0]

    return Embedder(model, head, space, transform).eval()


def load_embedder(
    run_dir: str,
    checkpoint: str | None = None,
    use_export: bool = False,
    space: str = "euclidean",
    device: str | torch.device = "cpu",
) -> Embedder:
    """The run's embedding network (latest checkpoint, a step-N, or its export) ready to embed."""
    return embedder_of(load_run(run_dir, checkpoint, use_export), space, device)


def image_files(paths: list[str]) -> list[str]:
    """Files named, and image files under named folders (sorted); raises naming what is missing."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            out += sorted(
                os.path.join(d, n) for d, _, names in os.walk(path) for n in names if n.lower().endswith(IMAGE_SUFFIXES)
            )
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise FileNotFoundError(f"--images {path} does not exist")
    if not out:
        raise FileNotFoundError(f"--images {paths} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    return out


@torch.no_grad()
def embed_images(
    embedder: Embedder, files: list[str], in_chans: int, batch_size: int = 64
) -> tuple[torch.Tensor, list[str], list[str]]:
    """(embeddings of the files that decode, those files, the files skipped with why)."""
    device = next(embedder.model.parameters()).device
    parts, kept, skipped = [], [], []
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            try:
                with open(path, "rb") as f:
                    batch.append(embedder.transform(decode_image(f.read(), in_chans)))
            except Exception as err:  # noqa: BLE001 - PIL raises many types for bad bytes
                skipped.append(f"{path}: {type(err).__name__}: {err}")
                continue
            kept.append(path)
        if batch:
            parts.append(embedder(torch.stack(batch).to(device)).cpu())
    if not parts:
        raise ValueError(f"no image decodes: {skipped[0]}{f' (and {len(skipped) - 1} more)' if skipped[1:] else ''}")
    return torch.cat(parts), kept, skipped


def shard_set(run: LoadedRun, root: str, split: str) -> EvalSet:
    """A split to embed, checked as a retrieval set but for the run's Recall@K (a split of 100 images could
    not be embedded for a run scored at R@1000, and embed takes no metrics.recall_ks override)."""
    return make_set(root, split, dataclasses.replace(run.cfg.metrics, recall_ks=(1,)), prefix="", protocol="retrieval")


def check_out(path: str) -> None:
    """--out before any work: a file in an existing folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise ValueError(f"--out {path} must name a file in an existing folder (create {folder} first)")


@torch.no_grad()
def embed_shards(
    embedder: Embedder, run: LoadedRun, root: str, split: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    eval_set = shard_set(run, root, split)
    cfg = eval_set.data_config(run.cfg.data)
    normaliser = InputNormaliser(cfg)
    device = next(embedder.model.parameters()).device
    embs, labels, keys = [], [], []
    for images, y, k in build_eval_loader(cfg, 0, 1, with_keys=True):
        embs.append(embedder(normaliser(images, device, torch.float32)).cpu())
        labels.append(y)
        keys += list(k)
    return torch.cat(embs), torch.cat(labels), keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.embed", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--shards", help="a converted data root (with --split)")
    what.add_argument("--images", nargs="+", help="image files or folders")
    p.add_argument("--split", default="", help="split of --shards (default: the run's data.eval_split, else test)")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--space", default="euclidean", help="euclidean (default), cosine, poincare, fc_euclidean")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None)
    source.add_argument("--export", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_out(args.out)
        run = load_run(args.run_dir, args.checkpoint, args.export)
        args.split = args.split or run.cfg.data.eval_split or "test"
        files = image_files(args.images) if args.images else []
        if args.shards:
            shard_set(run, args.shards, args.split)  # checks first
        embedder = embedder_of(run, args.space, args.device)
        out: dict = {"space": args.space, "source": run.source, "step": run.step}
        if args.shards:
            out["embeddings"], out["labels"], out["keys"] = embed_shards(embedder, run, args.shards, args.split)
        else:
            out["embeddings"], out["keys"], out["skipped"] = embed_images(embedder, files, run.cfg.data.in_chans)
            for line in out["skipped"]:
                print(f"skipped {line}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_file_atomic(args.out, lambda f: torch.save(out, f))  # an earlier output stays whole if this dies
    skipped = f" ({len(out['skipped'])} files skipped: they do not decode)" if out.get("skipped") else ""
    print(f"wrote {tuple(out['embeddings'].shape)} {args.space} embeddings to {args.out}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
