"""Command-line entry: pick a recipe, apply overrides, validate, hand the run to submitit."""
