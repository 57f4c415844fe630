"""Data pipeline for hypermetric.

This package owns everything between bytes on disk and batched tensors:
the data settings (`data.config`), shard listing and assignment
(`data.shards`), shard writing (`data.writer`), dataset converters
(`data.convert`), image transforms (`data.transforms`), per-sample parsing
(`data.samples`) and the reproducible, resumable loaders (`data.stream`).

It must never import `train`, `model`, `launch` or `slurm`: those layers
depend on `data`, not the other way round.
"""
