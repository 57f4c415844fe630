"""Evaluation sets: which splits a run is scored on, by which protocol, checked before any embedding.

A set is one split (or a query/gallery pair of splits) of a converted data root, with the protocol
its data set is evaluated by in the papers, chosen from the manifest's `dataset` name unless
`metrics.protocol` names one:
  classification  closed-set top-1 by each of the head's prediction rules (ImageNet, the digits)
  retrieval       open-set leave-one-out Recall@K and MAP@R (CUB, Cars, SOP, the open-set digits)
  query_gallery   queries ranked against a gallery split (In-shop)
  verification    insightface .bin pairs: flip-combined embeddings, 10-fold accuracy, VAL@FAR
The run's own held-out split (data.root / data.eval_split) is the primary set; its scalars keep
their plain names (acc_measure, poincare/R@1). Every set of metrics.eval_sets is prefixed with its
name (lfw/euclidean/accuracy).
"""

from __future__ import annotations

import dataclasses
import os

from data.config import DataConfig
from data.shards import label_space, list_shards, manifest_path, read_manifest, split_entry
from data.tars import check_shard_start
from train.config import MetricsConfig

# manifest "dataset" -> (protocol, default Recall@K); anything else is evaluated as classification
DATASET_PROTOCOLS: dict[str, tuple[str, tuple[int, ...]]] = {
    "mnist5k": ("classification", (1, 2, 4, 8)),
    "imagenet": ("classification", (1, 2, 4, 8)),
    "mnist5k_open": ("retrieval", (1, 2, 4, 8)),
    "cub": ("retrieval", (1, 2, 4, 8)),
    "cars": ("retrieval", (1, 2, 4, 8)),
    "sop": ("retrieval", (1, 10, 100, 1000)),
    "inshop": ("query_gallery", (1, 10, 20, 30, 40, 50)),
    "verification": ("verification", ()),
    # python -m data.convert folder: held-out images of the training classes, or classes training never saw
    "folder_classification": ("classification", (1, 2, 4, 8)),
    "folder_retrieval": ("retrieval", (1, 2, 4, 8)),
}
DEFAULT_KS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One scored split. `prefix` is "" for the primary set, else "<name>/"."""

    name: str
    root: str
    split: str
    protocol: str
    ks: tuple[int, ...]
    gallery_split: str = ""  # query_gallery only
    prefix: str = ""

    def data_config(self, base: DataConfig, split: str | None = None) -> DataConfig:
        """The run's data settings (transform, image size, normalisation, workers) pointed at this set,
        with a label space that keeps every label of the split (open-set labels are not head classes)."""
        split = split or self.split
        return dataclasses.replace(
            base,
            root=self.root,
            eval_split=split,
            num_classes=label_space(self.root, split),
            samples_per_class=0,
            sources=(),
            prepare="none",
        )


def dataset_protocol(root: str) -> tuple[str, tuple[int, ...]]:
    manifest = read_manifest(root) or {}
    return DATASET_PROTOCOLS.get(str(manifest.get("dataset", "")), ("classification", DEFAULT_KS))


def make_set(root: str, split: str, metrics: MetricsConfig, prefix: str, protocol: str = "auto") -> EvalSet:
    """An EvalSet with its protocol resolved and its files checked (raises naming the manifest)."""
    default_protocol, default_ks = dataset_protocol(root)
    protocol = default_protocol if protocol == "auto" else protocol
    ks = metrics.recall_ks or default_ks or DEFAULT_KS
    gallery = metrics.gallery_split if protocol == "query_gallery" else ""
    eval_set = EvalSet(
        name=split, root=root, split=split, protocol=protocol, ks=ks, gallery_split=gallery, prefix=prefix
    )
    check_set(eval_set, metrics.retrieval)
    for split_name in (split, gallery) if gallery else (split,):  # a bad file fails here, not at the first evaluation
        for shard in list_shards(root, split_name):
            check_shard_start(shard)
    return eval_set


def check_set(eval_set: EvalSet, retrieval: bool = False) -> None:
    """The cheap checks of a set, before anything is embedded (`retrieval`: metrics.retrieval is on)."""
    entry = split_entry(eval_set.root, eval_set.split)
    where = f"split {eval_set.split!r} of {manifest_path(eval_set.root)}"
    if eval_set.protocol == "query_gallery":
        if eval_set.gallery_split == eval_set.split:
            raise ValueError(f"{where}: query and gallery are the same split; set metrics.gallery_split")
        try:
            split_entry(eval_set.root, eval_set.gallery_split)
        except ValueError as err:
            raise ValueError(
                f"query split {eval_set.split!r} needs a gallery to be ranked against: {err}; set "
                "metrics.gallery_split=NAME (In-shop: gallery) or another metrics.protocol"
            ) from None
    if eval_set.protocol in ("retrieval", "query_gallery") or (eval_set.protocol == "classification" and retrieval):
        refs = (
            int(split_entry(eval_set.root, eval_set.gallery_split)["num_samples"])
            if eval_set.protocol == "query_gallery"
            else int(entry["num_samples"]) - 1
        )
        if max(eval_set.ks) > refs:
            fitting = ",".join(str(k) for k in eval_set.ks if k <= refs) or "1"
            raise ValueError(
                f"{where}: Recall@{max(eval_set.ks)} needs {max(eval_set.ks)} references but the split "
                f"offers {refs}; set metrics.recall_ks={fitting}"
            )
    if eval_set.protocol == "verification":
        issame = entry.get("issame")
        if not isinstance(issame, list):
            raise ValueError(
                f"{where} lists no 'issame' pair labels, so pairs cannot be rebuilt; re-convert the "
                ".bin files with `python -m data.convert verification --src DIR --out NEW_DIR`"
            )
        num = int(entry.get("num_samples", 0))
        if num % 2 or num != 2 * len(issame):
            raise ValueError(
                f"{where} holds {num} images for {len(issame)} pairs; a verification split needs exactly "
                "2 images per pair: re-convert its .bin file (python -m data.convert verification)"
            )


def _trained_classes(data: DataConfig) -> int:
    """The head rows data.root's labels train: its train split's label space (with data.sources, the rows
    above it are the other sources' classes; without, rows above it never train), at most data.num_classes;
    0 when unknown (num_classes unresolved, or no train split in the manifest)."""
    manifest = read_manifest(data.root)
    if not data.num_classes or manifest is None or data.train_split not in manifest.get("splits", {}):
        return data.num_classes if not data.sources else 0
    return min(data.num_classes, label_space(data.root, data.train_split))


def resolve_eval_sets(data: DataConfig, metrics: MetricsConfig, splits: list[str] | None = None) -> list[EvalSet]:
    """The primary set (data.root's `splits`, default data.eval_split) and every metrics.eval_sets entry."""
    sets: list[EvalSet] = []
    for split in splits if splits is not None else [data.eval_split] if data.eval_split else []:
        sets.append(
            make_set(data.root, split, metrics, prefix="" if not sets else f"{split}/", protocol=metrics.protocol)
        )
        labels, trained = label_space(data.root, split), _trained_classes(data)
        if sets[-1].protocol == "classification" and trained and labels > trained:
            raise ValueError(
                f"split {split!r} of {manifest_path(data.root)} has labels up to {labels - 1}, beyond the {trained} "
                f"classes the head trains for it: top-1 cannot score classes without a trained row of their own (it "
                "would read 0, or score them against another source's classes); score it with "
                "metrics.protocol=retrieval (or auto), or evaluate a split of the training classes"
            )
    for item in metrics.eval_sets:
        root, _, named = item.partition(":")
        if read_manifest(root) is None:
            raise FileNotFoundError(
                f"metrics.eval_sets names {root}, but {manifest_path(root)} does not exist; "
                "convert the set first (python -m data.convert ...)"
            )
        chosen = [s for s in named.split("+") if s] if named else _all_verification_splits(root)
        tag = os.path.basename(os.path.normpath(root))
        for split in chosen:
            sets.append(make_set(root, split, metrics, prefix=f"{split}/"))
        if not chosen:
            raise ValueError(f"metrics.eval_sets entry {item!r}: name the splits, e.g. {root}:{tag}")
    # the prefixes name the scalars, the names the eval_<name>.json files: both must be distinct (a primary
    # split "test" and another root's "test" had distinct prefixes, and the second file replaced the first)
    for kind, names in (("name", [s.name for s in sets]), ("prefix", [s.prefix for s in sets])):
        if len(set(names)) != len(names):
            raise ValueError(
                f"evaluation sets share a {kind} ({names}): each writes eval_<name>.json and logs <name>/...; "
                "name distinct splits in metrics.eval_sets (or evaluate the other root's split in its own run)"
            )
    return sets


def _all_verification_splits(root: str) -> list[str]:
    manifest = read_manifest(root) or {}
    if manifest.get("dataset") != "verification":
        return []
    return sorted(manifest.get("splits", {}))
