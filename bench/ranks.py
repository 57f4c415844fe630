"""Run a benchmark function on W fresh local ranks and collect what each reports.

Each configuration gets fresh processes (spawned, so a peak memory reading is this configuration's own);
`fn(rank, world, *args, out)` runs with MASTER_ADDR/PORT, RANK, WORLD_SIZE and LOCAL_* set and the cores
split between the ranks, and stores its result in `out[rank]`. A compiling configuration's ranks may get an
empty inductor cache (`empty_compile_cache`); `last_line` says why ranks failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator

import torch
import torch.multiprocessing as mp

from common.ports import free_port


def _entry(
    rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...], out: Any, threads: int | None
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    # DataLoader workers fork, as in a rank srun or torchrun started (a spawned process's default is spawn, whose
    # workers import torch and the project again: ~10 s per loader on 2 cores)
    mp.set_start_method("fork", force=True)
    # the CPUs this process may run on (os.cpu_count() counts the host's, beyond a cpuset or taskset)
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // world))
    fn(rank, world, *args, out)


def run_ranks(fn: Callable[..., None], world: int, *args: Any, threads: int | None = None) -> dict[int, dict[str, Any]]:
    """`fn` on `world` spawned ranks (a module-level function); {rank: what it stored in out[rank]}. Each rank
    gets `threads` torch threads, by default its share of this process's CPUs (a CPU probe's resident peak grows
    ~3.3 MiB per thread: a memory reading compared across machines should name its count)."""
    manager = mp.Manager()
    out = manager.dict()
    try:
        args_ = (world, free_port(), fn, args, out, threads)
        mp.start_processes(_entry, args=args_, nprocs=world, start_method="spawn")
        return {rank: dict(value) for rank, value in out.items()}
    finally:
        manager.shutdown()


@contextlib.contextmanager
def empty_compile_cache(compiling: bool) -> Iterator[None]:
    """A compiling row's ranks get an empty inductor cache (Triton's inside it): its first step is a cold
    compile, not a reuse of an earlier row's kernels."""
    if not compiling:
        yield
        return
    folder, before = tempfile.mkdtemp(prefix="bench-inductor-"), os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder  # the spawned ranks inherit it
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


def last_line(err: BaseException) -> str:
    """The exception line of a rank's traceback (a failed spawn carries it whole in its message): the last
    `SomeError: ...` line, not the advice dynamo appends after it ("Set TORCHDYNAMO_VERBOSE=1 ...")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)]
    return ((raised or lines or [type(err).__name__])[-1]).replace("|", "/")[:200]
