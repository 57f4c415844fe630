"""hypermetric's test suite (CPU, gloo process groups standing in for a cluster)."""
