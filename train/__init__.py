"""Training side of hypermetric: config tree, process groups, DeepSpeed engine, loop, checkpoints, metrics."""
