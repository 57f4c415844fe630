"""Model side of hypermetric: timm backbones, class-sharded proxy heads, their losses and collectives.

Nothing in this package imports `train`, `data`, `launch` or `slurm`.
"""
