"""ZeRO-3 parameter fetches without a host synchronisation where there is nothing to gather.

When a parameter's partition group has one rank (ZeRO-3 on one GPU, or any group of size 1), DeepSpeed
0.19 does not all-gather: `partition_parameters._no_gather_coalesced` points the parameter at its own
partition (`ds_tensor.to(current device)`, which is the tensor itself when it already lives there) and
returns a handle whose `wait()` calls `current_stream().synchronize()` on a GPU. The coordinator fetches
every submodule this way in forward, in the recompute of activation checkpointing and in backward, so
each step stalls the host on the GPU a few hundred times for ViT-L: the CPU can never queue kernels
ahead, and every launch latency is exposed (measured on an H200, P = 1: ZeRO-3 forward 215 ms against
ZeRO-2's 45 ms; docs/benchmarks.md).

The synchronisation protects a copy that was never made: with the partition already on the current
device and not quantised, no kernel is queued by the fetch, and the consumer runs on the stream that
last wrote the partition (the optimizer step) or waits for the fetch stream on the GPU
(`wait_stream` in the coordinator). `install()` wraps `_no_gather_coalesced` so that, for parameters
flagged by `enable()` (the engine's own, `zero.stage3_skip_local_fetch_sync`, default on) whose partition is on
the current device, the handle does everything DeepSpeed's does except that synchronisation. Anything
else (a partition in host memory or on NVMe, quantised weights, parameters of another engine) takes
DeepSpeed's own path. Tests: tests/test_zero3_local_fetch.py (identical training with and without it,
no host synchronisation in a step where DeepSpeed's path has one per fetch).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

FLAG = "_hypermetric_local_fetch"  # set on the parameters of an engine that may skip the synchronisation


class LocalPartitionHandle:
    """DeepSpeed's no-gather handle for parameters whose whole partition is on the current device:
    the parameters point at their partitions at once and `wait()` marks them available, with no
    synchronisation (nothing was queued)."""

    def __init__(self, params: list[Any]) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for param in params:
            if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
                raise RuntimeError(f"expected an unavailable parameter, got {param.ds_summary()}")
            param.ds_status = ZeroParamStatus.INFLIGHT
            param.data = param.ds_tensor.data.view(param.ds_shape)
        self.params = params
        self.complete = False

    def wait(self, **kwargs: Any) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if self.complete:
            return
        for param in self.params:
            if param.ds_status != ZeroParamStatus.INFLIGHT:
                raise RuntimeError(f"expected an in-flight parameter, got {param.ds_summary()}")
            param.ds_status = ZeroParamStatus.AVAILABLE
        self.complete = True


def _whole_partition_on(param: Any, device: torch.device) -> bool:
    tensor = getattr(param, "ds_tensor", None)
    return (
        tensor is not None
        and not hasattr(tensor, "ds_quant_scale")
        and tensor.device == device
        and tensor.numel() == param.ds_numel  # the whole parameter: a group of one rank
    )


def _wrap(deepspeed_no_gather: Any) -> Any:
    from deepspeed.accelerator import get_accelerator

    def no_gather_coalesced(params: Iterable[Any]) -> Any:
        params = sorted(params, key=lambda p: p.ds_id)  # DeepSpeed's order
        device = torch.device(get_accelerator().current_device_name())
        if params and all(getattr(p, FLAG, False) and _whole_partition_on(p, device) for p in params):
            return LocalPartitionHandle(params)
        return deepspeed_no_gather(params)

    no_gather_coalesced.hypermetric_wrapped = True  # type: ignore[attr-defined]
    return no_gather_coalesced


def install() -> None:
    """Wrap DeepSpeed's `_no_gather_coalesced` once per process (it is looked up as a module global by
    every caller); parameters not flagged by `enable` still take DeepSpeed's own path."""
    from deepspeed.runtime.zero import partition_parameters

    current = partition_parameters._no_gather_coalesced
    if not getattr(current, "hypermetric_wrapped", False):
        partition_parameters._no_gather_coalesced = _wrap(current)


def enable(module: nn.Module, skip_sync: bool = True) -> int:
    """Let the ZeRO-3 parameters of `module` be fetched without the synchronisation (`skip_sync`), or take
    that back (DeepSpeed's own path); how many parameters were marked."""
    install()
    marked = 0
    for param in module.parameters():
        if hasattr(param, "ds_id"):
            setattr(param, FLAG, skip_sync)
            marked += 1
    return marked
