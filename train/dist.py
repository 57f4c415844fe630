"""Process-group lifecycle, rank queries and metric reductions; the only reader of rank env vars.

A job learns its place from the standard variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which the launcher (`slurm/job.py`) exports from
submitit's JobEnvironment (MASTER_PORT from the job id, as slurm/train.sbatch). Rank 0 serves the
rendezvous store and every rank waits HYPERMETRIC_RENDEZVOUS_S for the others (torchrun: its agent's
store). Backend: NCCL on GPUs, gloo on CPU. `NCCL_DEFAULTS` are applied here,
where unset, just before the NCCL group is created: every launcher (submitit, slurm/train.sbatch,
torchrun) gets the same set. `collective_device()` is where a collective's tensors must live.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


# Settings for real GPU clusters, applied only where the user (or the sbatch script) did not set them.
NCCL_DEFAULTS: dict[str, str] = {
    # a rank that dies makes its peers fail within the collective timeout instead of hanging forever
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # NCCL's own warnings in the job log, without its per-collective chatter
    "NCCL_DEBUG": "WARN",
    # InfiniBand timeouts at the NCCL default (18 = ~1 s x 2^18) are too short on busy fabrics
    "NCCL_IB_TIMEOUT": "22",
}


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environ() -> DistEnv:
    """Rank and world size from the environment (a single process when nothing is set). Refuses a process
    started as one of several srun tasks without RANK: each would train alone, as rank 0 of 1, in one run dir."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    if "RANK" not in os.environ and tasks.isdigit() and int(tasks) > 1:
        raise RuntimeError(
            f"this process is task {os.environ.get('SLURM_PROCID', '?')} of {tasks} srun tasks, but RANK and "
            "WORLD_SIZE are not set: every task would train alone as rank 0 of 1 in the same run dir. Submit with "
            "`python -m launch --slurm ...` or `sbatch slurm/train.sbatch ...`, or export RANK=$SLURM_PROCID "
            "WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID and MASTER_ADDR/MASTER_PORT in each task"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = os.environ.get("LOCAL_WORLD_SIZE") or slurm_tasks_on_this_node() or world
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(local_world),
    )


def slurm_tasks_on_this_node() -> int | None:
    """Tasks of this srun step on this node, or None outside one. SLURM_NTASKS_PER_NODE is set only with
    --ntasks-per-node and is wrong for an uneven layout (`--ntasks=5` on 2 nodes: 3 + 2); the step's
    SLURM_STEP_TASKS_PER_NODE ("3,2", or "2(x3),1" for 2,2,2,1) with SLURM_NODEID always says."""
    layout, node = os.environ.get("SLURM_STEP_TASKS_PER_NODE"), os.environ.get("SLURM_NODEID")
    if not layout or node is None:
        return None
    counts = []
    for part in layout.split(","):
        tasks, _, times = part.partition("(x")
        counts += [int(tasks)] * int(times.rstrip(")") or 1)
    return counts[int(node)]


def slurm_job_id() -> str:
    """This task's Slurm job id ("" outside Slurm); unique per array task."""
    return os.environ.get("SLURM_JOB_ID", "")


def check_visible_gpus(env: DistEnv) -> None:
    """Every rank takes cuda:LOCAL_RANK (as DeepSpeed's engine does), so each must see all its node's GPUs; a task
    bound to its own GPU (Slurm's --gpus-per-task or --gpu-bind, CUDA_VISIBLE_DEVICES set per rank) sees one,
    and cuda.set_device would fail with no word of why."""
    visible = torch.cuda.device_count()
    if env.local_rank >= visible:
        raise RuntimeError(
            f"rank {env.rank} is local rank {env.local_rank} of {env.local_world_size} on its node but sees "
            f"{visible} GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): every "
            "rank takes cuda:LOCAL_RANK, so each task must see all of its node's GPUs. Ask Slurm with "
            "slurm.gpus_per_node (no gpus_per_task or gpu_bind in slurm.sbatch_extra), start one process per GPU "
            "with torchrun, or start fewer tasks per node"
        )


def init_distributed(env: DistEnv, timeout_s: int = 1800) -> tuple[torch.device, bool]:
    """Start the default process group (also for one process, so collectives always work).

    Returns the device and whether this call created the group (a caller that did not create it,
    e.g. a test harness, must not destroy it).
    """
    # DeepSpeed's CPU accelerator counts local devices from LOCAL_SIZE (else it shells out to numactl).
    os.environ.setdefault("LOCAL_SIZE", str(env.local_world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    if torch.cuda.is_available():
        check_visible_gpus(env)
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if dist.is_initialized():
        return device, False
    if backend == "nccl":
        # Read when the group is created (TORCH_NCCL_*) and at NCCL's first communicator (NCCL_*), both after this.
        for key, value in NCCL_DEFAULTS.items():
            os.environ.setdefault(key, value)
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent hosts the store on MASTER_PORT and stops every worker when one fails
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    else:
        store = rendezvous_store(env, rendezvous_timeout_s())
        store.set_timeout(timeout)  # later store reads (e.g. NCCL ids at a group's first collective) wait as long
        dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    return device, True


def rendezvous_timeout_s() -> int:
    """How long ranks wait for each other at start: HYPERMETRIC_RENDEZVOUS_S, default 600 (torchrun's join timeout)."""
    return int(os.environ.get("HYPERMETRIC_RENDEZVOUS_S", "600"))


def rendezvous_store(env: DistEnv, wait_s: int) -> dist.TCPStore:
    """Rank 0 serves the TCPStore on MASTER_ADDR:MASTER_PORT and waits for every rank to connect.

    Its own, shorter timeout: with torch's env:// rendezvous a rank whose peer died before connecting (a
    port already in use, an import error on one node) waited the whole collective timeout, 30 minutes
    of every GPU of the job, before failing. Here both sides give up after `wait_s` and say why.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        return dist.TCPStore(
            addr,
            port,
            env.world_size,
            is_master=env.rank == 0,
            timeout=datetime.timedelta(seconds=wait_s),
            wait_for_workers=True,
            multi_tenant=True,  # as torch's own: another store of this process may share the port
        )
    except (RuntimeError, OSError) as err:  # DistStoreError / DistNetworkError are RuntimeErrors
        waited_for = "every other rank to connect" if env.rank == 0 else "rank 0's store"
        raise RuntimeError(
            f"rank {env.rank} of {env.world_size}: rendezvous at {addr}:{port} failed after waiting up to {wait_s} s "
            f"for {waited_for}: {err}. Look for the error in the other ranks' logs (a rank that failed to start, "
            "or a port already in use); HYPERMETRIC_RENDEZVOUS_S sets the wait, MASTER_PORT the port"
        ) from err


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors for a default-group collective must live: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce_mean(values: dict[str, float], summed: frozenset[str] = frozenset()) -> dict[str, float]:
    """Mean of each scalar over ranks (one all-reduce); keys in `summed` get the sum instead."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    world = dist.get_world_size()
    return {k: float(v) if k in summed else float(v) / world for k, v in zip(keys, t)}


def max_over_ranks(value: float) -> float:
    """The largest of every rank's `value` (one all-reduce): any-rank flags, peak memory."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sum_over_ranks_(tensors: list[torch.Tensor]) -> None:
    """In-place SUM all-reduce (replicated head parameters' partial gradients)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for t in tensors:
        dist.all_reduce(t)


def global_norm(local_tensors: list[torch.Tensor], replicated_tensors: list[torch.Tensor]) -> float:
    """L2 norm over ranks: sharded tensors summed over ranks, replicated ones counted once."""
    sq = torch.tensor([_sum_of_squares(local_tensors)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        sq = sq.to(collective_device())
        dist.all_reduce(sq)
    return (float(sq.item()) + _sum_of_squares(replicated_tensors)) ** 0.5


def _sum_of_squares(tensors: list[torch.Tensor]) -> float:
    """Sum of squares in fp64, with no fp64 copy of each tensor (a face head's gradient is 350 MB in fp64) and
    one host synchronisation."""
    return float(sum((torch.linalg.vector_norm(t.detach(), dtype=torch.float64) ** 2 for t in tensors), start=0.0))


def broadcast_running_stats_(module: torch.nn.Module) -> int:
    """Rank 0's running statistics of the normalisation layers (buffers named running_*, e.g. BatchNorm's
    mean and variance) on every rank, in place; returns how many buffers. DeepSpeed, unlike DDP (which
    broadcasts rank 0's buffers at every forward), never syncs buffers: each rank's statistics follow its
    own data, while a checkpoint stores rank 0's. Called before every evaluation, so each rank embeds with
    the statistics the checkpoint holds; rank 0's own are never changed, so saves and resumes stay exact.
    One broadcast of an fp32 copy of them all, whatever the buffers' dtype."""
    stats = [b for name, b in module.named_buffers() if name.rsplit(".", 1)[-1].startswith("running_")]
    stats = [b for b in stats if b.is_floating_point()]
    if not stats or not dist.is_initialized() or dist.get_world_size() == 1:
        return len(stats)
    flat = torch.cat([b.detach().reshape(-1).float() for b in stats]).to(collective_device())
    dist.broadcast(flat, src=0)
    with torch.no_grad():
        for b, part in zip(stats, flat.split([b.numel() for b in stats]), strict=True):
            b.copy_(part.view_as(b))
    return len(stats)


def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs per rank (evaluation sets)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def broadcast_object(obj: object) -> object:
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
