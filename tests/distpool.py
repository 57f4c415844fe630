"""A pool of W long-lived processes joined in one gloo group, reused across tests.

Starting processes and importing torch/DeepSpeed costs seconds; a pool pays it once per session.
`pool.run(fn, *args)` calls the module-level function `fn` on every rank and returns the list of
per-rank results (rank order), re-raising any rank's exception with its traceback.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
import traceback
from typing import Any, Callable

from common.ports import free_port


def _serve(rank: int, world: int, port: int, conn: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        LOCAL_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    import torch
    import torch.distributed as dist

    # DataLoader workers fork, as in a rank srun, torchrun or submitit started: a spawned process's default is
    # spawn, whose workers import torch and the project again (~10 s per loader on 2 cores)
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # report everything, keep serving
            conn.send(("err", traceback.format_exc()))
    # a test's deepspeed.comm.init_distributed on this group (LOCAL_SIZE = world: one machine) gave each rank a
    # 66 MiB all-reduce buffer in /dev/shm, i.e. memory, which DeepSpeed never unlinks: two left per suite
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}")
    dist.destroy_process_group()


class DistPool:
    """W processes with an initialised gloo default group."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self.world_size = world_size
        self.broken = False
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, world_size, port, child))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 600, **kwargs: Any) -> list[Any]:
        """Call fn on every rank. If a rank fails, the others may hang in a collective: then the
        pool is torn down (`broken`) and the failing rank's traceback is raised at once."""
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.world_size:
            for rank, conn in enumerate(self.conns):
                if rank not in replies and conn.poll(0.05):
                    replies[rank] = conn.recv()
            errors = [f"rank {r}:\n{payload}" for r, (status, payload) in sorted(replies.items()) if status == "err"]
            late = time.monotonic() > deadline
            if errors and (len(replies) < self.world_size) or late:
                self.kill()
                raise RuntimeError(
                    "\n".join(errors)
                    or f"ranks {sorted(set(range(self.world_size)) - set(replies))} did not answer within {timeout_s} s"
                )
        errors = [f"rank {r}:\n{payload}" for r, (status, payload) in sorted(replies.items()) if status == "err"]
        if errors:
            raise RuntimeError("\n".join(errors))
        return [replies[r][1] for r in range(self.world_size)]

    def kill(self) -> None:
        self.broken = True
        for proc in self.procs:
            proc.kill()

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
