"""Run a benchmark function on W fresh local ranks and collect what each reports.

Each configuration gets fresh processes (spawned, so a peak memory reading is this configuration's own);
`fn(rank, world, *args, out)` runs with MASTER_ADDR/PORT, RANK, WORLD_SIZE and LOCAL_* set and the cores
split between the ranks, and stores its result in `out[rank]`.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...], out: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fn(rank, world, *args, out)


def run_ranks(fn: Callable[..., None], world: int, *args: Any) -> dict[int, dict[str, Any]]:
    """`fn` on `world` spawned ranks (a module-level function); {rank: what it stored in out[rank]}."""
    manager = mp.Manager()
    out = manager.dict()
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, out), nprocs=world, start_method="spawn")
        return {rank: dict(value) for rank, value in out.items()}
    finally:
        manager.shutdown()
