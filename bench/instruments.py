"""Instruments for bench/train.py: phase timers, time inside collectives, aten-op counts, a profiled step with
the GPU's busy share, peak memory and forward FLOPs. Each works on CPU and CUDA alike."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import resource
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from train.config import RunConfig

COMM_FUNCTIONS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all_single",
    "reduce",
    "barrier",
)


@dataclasses.dataclass
class Timer:
    """Seconds per named phase; `sync` makes the device finish queued work before a phase ends."""

    device: torch.device
    totals: dict[str, float] = dataclasses.field(default_factory=dict)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def timed_collectives(timer: Timer) -> Iterator[None]:
    """Count the time inside torch.distributed's collectives (DeepSpeed's comm calls them too) as "comm";
    on CUDA each call is synchronised so its time is the collective's, not its launch's."""
    originals = {name: getattr(dist, name) for name in COMM_FUNCTIONS}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with timer.phase("comm"):
                work = fn(*args, **kwargs)
                if kwargs.get("async_op") and work is not None:
                    work.wait()
            return work

        return timed

    for name, fn in originals.items():
        setattr(dist, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


class OpCounter(Timer):
    """A Timer whose phases count the aten ops they dispatch instead of timing them: on a GPU each op is
    (at least) one kernel launch, so a phase with thousands of small ops is launch-bound there; the count
    is the same on CPU, where it can be measured without a GPU."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.ops: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.ops

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        with Count():
            yield


def forward_flops_per_image(cfg: RunConfig) -> float:
    """Forward FLOPs of one image (torch.utils.flop_counter), counted on the meta device: no weights, no
    GPU time, and attention counted by its formula whatever kernel a device would pick (ViT-L/16 at 224:
    123.2 GFLOP, so 369.6 for a training step's 3x)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.backbone import build_backbone

    with torch.device("meta"):
        model = build_backbone(dataclasses.replace(cfg.model, checkpoint_path=""))
        x = torch.randn(2, cfg.data.in_chans, cfg.data.image_size, cfg.data.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def profile_step(runner: Any, batches: Any, device: torch.device, trace: str) -> dict[str, Any]:
    """One step under torch.profiler: its top ops by self time and, on CUDA, how busy the GPU was
    (kernel time / wall time: far below 100% means the host, not the GPU, sets the pace)."""
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
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
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
