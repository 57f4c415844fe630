"""Cluster glue: submitit executors and the job object; the only place that knows about Slurm."""
