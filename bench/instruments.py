"""Instruments for bench/train.py: phase timers, time inside collectives, aten-op counts, a profiled step with
the GPU's busy share, peak memory, the memory planner's figure, forward FLOPs and MFU. Each works on CPU and CUDA
alike."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from common.procfs import proc_status_mb
from train.config import RunConfig

# collectives both torch.distributed (functions) and DeepSpeed's backend (methods) have
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "reduce",
    "barrier",
    "monitored_barrier",
    "batch_isend_irecv",
)
# torch.distributed's, looked up on the module at each call by our code and by DeepSpeed's backend for most of
# its calls (torch 2.14's all_gather_into_tensor / reduce_scatter_tensor call the *_single forms)
COMM_FUNCTIONS = (*COLLECTIVES, "all_gather_single", "reduce_scatter_single")
# DeepSpeed's backend (deepspeed.comm.comm.cdb, a TorchBackend) keeps its own references to torch's
# all_gather_into_tensor / reduce_scatter_tensor (all_gather_function / reduce_scatter_function, taken when
# it is built), so patching torch.distributed misses ZeRO's parameter all-gathers and gradient
# reduce-scatters: its methods are wrapped on the instance as well. (Point-to-point send/recv are left
# alone: waiting on an isend before the matching irecv is posted could deadlock.)
DEEPSPEED_COMM = (
    *COLLECTIVES,
    "inference_all_reduce",
    "reduce_scatter_function",
    "all_gather_base",
    "all_gather_coalesced",
    "all_gather_function",
)


@dataclasses.dataclass
class Timer:
    """Seconds per named phase; `sync` makes the device finish queued work before a phase ends."""

    device: torch.device
    totals: dict[str, float] = dataclasses.field(default_factory=dict)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.add(name, time.perf_counter() - start)

    @contextlib.contextmanager
    def split(self, first: str, second: str) -> Iterator[Callable[[], None]]:
        """One interval timed as two phases: up to the first call of the yielded `mark()` (which
        synchronises the device, e.g. from a tensor hook when the embedding's gradient arrives) it is
        `first`, after it `second` (all `second` if nothing marked); the two add up to the interval."""
        marks: list[float] = []

        def mark() -> None:
            if not marks:
                self.sync()
                marks.append(time.perf_counter())

        self.sync()
        start = time.perf_counter()
        yield mark
        self.sync()
        end = time.perf_counter()
        cut = marks[0] if marks else start
        self.add(first, cut - start)
        self.add(second, end - cut)


def _wait(result: Any) -> None:
    """Wait for an async collective's handle(s) (torch Work, DeepSpeed's, a list of them); a synchronous
    call returns None."""
    for work in result if isinstance(result, (list, tuple)) else (result,):
        if hasattr(work, "wait"):
            work.wait()


@contextlib.contextmanager
def timed_collectives(timer: Timer) -> Iterator[None]:
    """Count the time inside collectives as "comm": torch.distributed's functions and, when DeepSpeed's
    communication backend is up, its methods (which call torch through references of their own). Only the
    outermost call is timed (per thread: DeepSpeed's methods call torch's, a torch function may call another),
    so nothing is counted twice; an async call is waited for inside it, and on CUDA each call is
    synchronised, so its time is the collective's, not its launch's."""
    import sys

    depth = threading.local()

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(depth, "n", 0):
                return fn(*args, **kwargs)
            depth.n = 1
            try:
                with timer.phase("comm"):
                    work = fn(*args, **kwargs)
                    _wait(work)
            finally:
                depth.n = 0
            return work

        return timed

    restore: list[Callable[[], None]] = []
    for name in COMM_FUNCTIONS:
        fn = getattr(dist, name, None)
        if fn is not None:
            setattr(dist, name, wrap(fn))
            restore.append(functools.partial(setattr, dist, name, fn))
    ds_comm = sys.modules.get("deepspeed.comm.comm")  # not imported (the bare loop): nothing of it to time
    cdb = getattr(ds_comm, "cdb", None)
    for name in DEEPSPEED_COMM if cdb is not None else ():
        fn = getattr(cdb, name, None)
        if not callable(fn):
            continue
        if name in vars(cdb):  # an instance attribute (all_gather_function, ...): put the same object back
            restore.append(functools.partial(setattr, cdb, name, fn))
        else:  # a method: drop the instance's wrapper, the class's method shows through again
            restore.append(functools.partial(delattr, cdb, name))
        setattr(cdb, name, wrap(fn))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


class OpCounter(Timer):
    """A Timer whose phases count the aten ops they dispatch instead of timing them: on a GPU each op is
    (at least) one kernel launch, so a phase with thousands of small ops is launch-bound there; the count
    is the same on CPU, where it can be measured without a GPU."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.ops: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._counting([name]):
            yield

    @contextlib.contextmanager
    def split(self, first: str, second: str) -> Iterator[Callable[[], None]]:
        """The ops before `mark()` count to `first`, those after it to `second` (nothing synchronised)."""
        current = [first]

        def mark() -> None:
            current[0] = second

        with self._counting(current):
            yield mark

    @contextlib.contextmanager
    def _counting(self, current: list[str]) -> Iterator[None]:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.ops

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                counts[current[0]] = counts.get(current[0], 0) + 1
                return func(*args, **(kwargs or {}))

        with Count():
            yield


def forward_flops_per_image(cfg: RunConfig) -> float:
    """Forward FLOPs of one image (torch.utils.flop_counter), counted on the meta device: no weights, no
    GPU time, and attention counted by its formula whatever kernel a device would pick (ViT-L/16 at 224: the
    counter gives 123.1 GFLOP, 369.3 for a training step's 3x; the issue's 369.6 is timm's 61.6 GMAC, rounded)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.backbone import build_backbone

    with torch.device("meta"):
        model = build_backbone(dataclasses.replace(cfg.model, checkpoint_path=""))
        x = torch.randn(2, cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2


def planned_mb(cfg: RunConfig) -> float:
    """`python -m launch --estimate`'s peak per rank for `cfg`, less its runtime reserve (CUDA context, NCCL,
    allocator slack): what CUDA's max_memory_allocated should come to. Computed on the host's CPU."""
    from launch.estimate import RUNTIME_RESERVE, estimate

    return (estimate(cfg, gpu_mem_gib=1.0).peak - RUNTIME_RESERVE) / 2**20


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak of memory allocated to tensors; else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return proc_status_mb("VmHWM")["VmHWM"]  # this process's own peak (ru_maxrss carries the parent's)


def peak_reserved_mb(device: torch.device) -> float | None:
    """CUDA: the peak of memory the caching allocator held (allocated + cached free blocks: what the GPU
    had to have); None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    return None


def profile_step(runner: Any, batches: Any, device: torch.device, trace: str) -> dict[str, Any]:
    """One step under torch.profiler: its top ops by self time and, on CUDA, how busy the GPU was computing
    (kernel time / wall time: far below 100% means the host, not the GPU, sets the pace). NCCL's kernels are
    left out: one runs from its launch until every rank has joined, so a rank waiting for a slower peer would
    read as busy."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    timer = Timer(device)
    timer.sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        runner.step(batches, None)
        timer.sync()
        wall = time.perf_counter() - start
    from torch.autograd import DeviceType

    kernels = [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not e.name.startswith("nccl")
    ]
    if trace:
        prof.export_chrome_trace(trace)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15)
    return {"table": table, "busy": covered_us(kernels) / 1e6 / wall if cuda else None}


def covered_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: time with at least one kernel running, kernels on
    several streams at once counted once (summing their durations would count that time twice)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


# dense peaks (FLOP/s, no sparsity) by device name from NVIDIA's data sheets: (bf16 tensor cores, plain
# fp32: no row enables TF32); the first name found in torch.cuda.get_device_name counts, so the specific
# parts come before their family ("NVIDIA H100 PCIe" is no SXM "NVIDIA H100 80GB HBM3")
PEAK_FLOPS = (
    ("H200 NVL", 835.5e12, 60e12),
    ("H200", 989.4e12, 67e12),  # SXM: the H100 SXM's compute
    ("H100 PCIe", 756.5e12, 51e12),
    ("H100 NVL", 835.5e12, 60e12),
    ("H100", 989.4e12, 67e12),  # SXM
    ("A100", 312e12, 19.5e12),
)


def peak_flops(device: str, bf16: bool) -> float | None:
    """The dense peak of the device named `device` for bf16 or fp32 (no TF32) rows; None if unknown."""
    for name, bf16_peak, fp32_peak in PEAK_FLOPS:
        if name in device:
            return bf16_peak if bf16 else fp32_peak
    return None


def mfu(row: dict[str, Any], cfg: RunConfig, world: int) -> str:
    """A row's model FLOPs utilisation per GPU: 3 x its forward FLOPs per image x img/s over the device's dense
    peak; "-" without FLOPs or a known peak (CPUs)."""
    peak = peak_flops(row["device"], cfg.zero.bf16)
    if not row["flops"] or peak is None:
        return "-"
    per_gpu = row["images"] / row["step_s"]
    return f"{100 * 3 * row['flops'] * per_gpu / peak:.1f}%"
