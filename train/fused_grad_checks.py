"""Multi-tensor gradient tests for DeepSpeed's ZeRO optimizer (ZeRO-2, fp32 ZeRO-1): a few kernels per step.

(bf16 ZeRO-1 runs on DeepSpeed's BF16_Optimizer, ZeRO-3 on its own optimizer: both keep their own tests.)

DeepSpeed 0.19's `DeepSpeedZeroOptimizer.step` tests every gradient tensor of its partition for inf/NaN
one by one (`has_inf_or_nan`: amax, amin, isfinite, ... about 12 aten ops per tensor) and takes their norms
one by one (`get_grad_norm_direct`: a cast and a norm per tensor). For ViT-L's 296 tensors that is ~5,000
aten ops per optimizer step, each a kernel launch on a GPU, where the update itself is one fused AdamW over
a flat partition: the step becomes launch-bound (measured on an H200: 52-75 ms per optimizer phase against
4-5 ms for a bare fused AdamW; on CPU the op counts are 6,342 against 6, bench/train.py --count-ops).

`install` replaces both methods on one optimizer instance (not on the class) with `torch._foreach_norm`
over the same tensors, in DeepSpeed's own norm dtype (`get_norm_dtype`, fp64 where the device has it):
  * overflow: the partition holds a non-finite value iff some tensor's L2 norm is non-finite (NaN and inf
    propagate through a sum of squares; in fp64 the squares of finite bf16/fp32 values cannot overflow);
  * norm: the same per-tensor L2 norms, squared and summed, all-reduced, rooted and masked exactly as
    DeepSpeed does (the -1 sentinel for a non-finite norm included).
Everything else (the all-reduce of the overflow flag, skipping, clipping) stays DeepSpeed's. A DeepSpeed
whose optimizer lacks what this replaces is left alone with a warning; `zero.fused_grad_checks=false`
turns it off. Tests: tests/test_fused_grad_checks.py (equal to DeepSpeed's own methods on 1 and 2 ranks,
NaN and inf found, op counts, training trajectories unchanged).
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch

# what the replacement reads of DeepSpeed's optimizer; absent in another DeepSpeed -> not installed
_REQUIRED = (
    "averaged_gradients",
    "bit16_groups",
    "dp_process_group",
    "model_parallel_rank",
    "device",
    "_model_parallel_all_reduce",
    "has_overflow_partitioned_grads_serial",
    "get_grad_norm_direct",
)


def _norm_dtype() -> torch.dtype:
    from deepspeed.runtime.zero.utils import get_norm_dtype

    return get_norm_dtype()


def _accelerator_device() -> str:
    from deepspeed.accelerator import get_accelerator

    return str(get_accelerator().current_device_name())


@torch.no_grad()
def tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of every tensor, as one [N] tensor in DeepSpeed's norm dtype (one multi-tensor kernel)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=_norm_dtype()))


def _partition_overflow(self: Any) -> torch.Tensor:
    """Replaces `has_overflow_partitioned_grads_serial`: a [1] bool tensor, True iff a gradient of this
    rank's partition holds inf or NaN (DeepSpeed then all-reduces it over ranks)."""
    grads = [g for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
    if not grads:
        return torch.zeros(1, dtype=torch.bool, device=_accelerator_device())
    return tensor_norms(grads).isfinite().all().logical_not().reshape(1).to(_accelerator_device())


def _grad_norm_direct(self: Any, gradients: list[torch.Tensor], params: list[Any], norm_type: float = 2) -> Any:
    """Replaces `get_grad_norm_direct` for the L2 norm (other norms: DeepSpeed's own): the same tensors
    chosen the same way (no alignment padding, no pipeline replicas, model-parallel rank 0 or model-parallel
    parameters), their norms in one multi-tensor kernel."""
    from deepspeed import comm as dist
    from deepspeed.runtime.zero import stage_1_and_2 as zero12

    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    chosen = []
    param_gradients = (g for g in gradients if not getattr(g, "_zero_padding", False))
    for g, p in zip(param_gradients, params):
        if hasattr(p, zero12.PIPE_REPLICATED) and p.ds_pipe_replicated:
            continue
        if zero12.is_model_parallel_parameter(p) or self.model_parallel_rank == 0:
            chosen.append(g)
    if chosen:
        total = tensor_norms(chosen).to(_accelerator_device()).pow(2).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    zero12.mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def install(optimizer: Any) -> bool:
    """Give a DeepSpeedZeroOptimizer (ZeRO-1/2) the multi-tensor tests; whether it was installed."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return False  # ZeRO-3, the bf16 ZeRO-1 optimizer and stage 0 have their own paths
    missing = [name for name in _REQUIRED if not hasattr(optimizer, name)]
    if missing or getattr(optimizer, "cpu_offload", False):
        if missing:
            warnings.warn(
                f"zero.fused_grad_checks: this DeepSpeed's ZeRO optimizer lacks {missing}; keeping its "
                "per-tensor gradient tests (slower on GPUs, same results)",
                stacklevel=2,
            )
        return False
    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(_partition_overflow, optimizer)
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm_direct, optimizer)
    return True
