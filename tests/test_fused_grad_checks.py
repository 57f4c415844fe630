"""train/fused_grad_checks.py: the multi-tensor inf/NaN test and gradient norm give DeepSpeed's own results.

The reference is DeepSpeed's own per-tensor method, called through the class on the same optimizer and
the same gradients, on 1 and 2 gloo ranks (each rank holds another partition); NaN, +inf and -inf on one
rank only are found on every rank; the replacement issues a fixed handful of aten ops where DeepSpeed's
issues several per tensor (each a kernel launch on a GPU); and training trajectories with and without it
agree.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from train.config import OptimConfig, ZeroConfig

LAYERS, WIDTH, BATCH = 10, 6, 4  # 20 parameter tensors


def make_backbone() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.Tanh())])


def engine_after_backward(stage: int, bf16: bool, fused: bool, grad_clip: float = 0.0) -> Any:
    import torch.distributed as dist

    from train.engine import build_engine

    rank = dist.get_rank()
    engine = build_engine(
        make_backbone(),
        OptimConfig(warmup_steps=0, grad_clip=grad_clip),
        ZeroConfig(stage=stage, bf16=bf16, fused_grad_checks=fused),
        micro_batch=BATCH,
        max_steps=10,
    )
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, WIDTH, generator=g).to(engine.device, next(engine.module.parameters()).dtype)
    engine.backward(engine(x).float().pow(2).sum())
    return engine


def _norms(opt: Any) -> list[torch.Tensor]:
    """Each group's gradient norm by the installed method and by DeepSpeed's own, in the same order on
    every rank (both all-reduce)."""
    out = []
    for i in range(len(opt.bit16_groups)):
        grads, params = opt.averaged_gradients[i], opt.params_in_partition[i]
        out += [opt.get_grad_norm_direct(grads, params), type(opt).get_grad_norm_direct(opt, grads, params)]
    return [t.detach().cpu().clone().reshape(()) for t in out]


def _overflow_flags(opt: Any) -> tuple[bool, bool]:
    """(the installed test through DeepSpeed's has_overflow, which all-reduces it; DeepSpeed's own per-tensor
    test, all-reduced the same way)."""
    import torch.distributed as dist

    own = type(opt).has_overflow_partitioned_grads_serial(opt).byte()
    dist.all_reduce(own, op=dist.ReduceOp.MAX)
    return opt.has_overflow(), bool(own.item())


def compare_with_deepspeed(stage: int, bf16: bool) -> dict[str, Any]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    opt = engine_after_backward(stage, bf16, fused=True).optimizer
    result: dict[str, Any] = {"norms": _norms(opt), "overflow": {"finite": _overflow_flags(opt)}}
    first = next(g for i in range(len(opt.bit16_groups)) for g in opt.averaged_gradients[i] if g.numel())
    saved = first.flatten()[0].item()
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        if rank == world - 1:  # one rank only: the flag must reach the others
            first.view(-1)[0] = value
        result["overflow"][name] = _overflow_flags(opt)
        first.view(-1)[0] = saved
    if rank == world - 1:
        first.view(-1)[0] = float("nan")
    result["norm_with_nan"] = _norms(opt)[:2]  # DeepSpeed's -1 sentinel for a non-finite norm
    return result


@pytest.mark.parametrize("world", [1, 2])
def test_fused_checks_equal_deepspeeds_own(dist_pool, world: int) -> None:
    pool = dist_pool(world)
    for stage, bf16 in ((2, False), (2, True), (1, False)):
        for r in pool.run(compare_with_deepspeed, stage, bf16):
            msg = f"ZeRO-{stage} {'bf16' if bf16 else 'fp32'} world {world}"
            fused, own = r["norms"][0::2], r["norms"][1::2]
            assert all(float(n) > 0 for n in own), msg
            for a, b in zip(fused, own):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0, msg=msg)
            assert r["overflow"]["finite"] == (False, False), msg
            for name in ("nan", "inf", "-inf"):
                assert r["overflow"][name] == (True, True), f"{msg}: {name} on the last rank"
            assert [float(n) for n in r["norm_with_nan"]] == [-1.0, -1.0], msg


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Any) -> int:
    with CountOps() as mode:
        fn()
    return sum(mode.count.values())


def op_counts() -> dict[str, int]:
    opt = engine_after_backward(2, bf16=True, fused=True).optimizer
    own = type(opt)
    grads, params = opt.averaged_gradients[0], opt.params_in_partition[0]
    return {
        "tensors": len(grads),
        "fused_overflow": count_ops(opt.has_overflow_partitioned_grads_serial),
        "own_overflow": count_ops(lambda: own.has_overflow_partitioned_grads_serial(opt)),
        "fused_norm": count_ops(lambda: opt.get_grad_norm_direct(grads, params)),
        "own_norm": count_ops(lambda: own.get_grad_norm_direct(opt, grads, params)),
    }


def test_fused_checks_issue_a_few_ops_not_a_few_per_tensor(dist_pool) -> None:
    (r,) = dist_pool(1).run(op_counts)
    assert r["tensors"] == LAYERS  # group 0: the weights (decayed); group 1 holds the biases
    assert r["own_overflow"] >= 2 * 3 * LAYERS and r["own_norm"] >= LAYERS, r  # the reference: per tensor
    assert r["fused_overflow"] <= 10 and r["fused_norm"] <= 14, r


def trajectory(fused: bool, steps: int = 3) -> dict[str, Any]:
    import torch.distributed as dist

    from train.engine import build_engine

    rank = dist.get_rank()
    engine = build_engine(
        make_backbone(),
        OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.05),  # small: the clip is active every step
        ZeroConfig(stage=2, fused_grad_checks=fused),
        micro_batch=BATCH,
        max_steps=10,
    )
    norms = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        engine.backward(engine(torch.randn(BATCH, WIDTH, generator=g).to(engine.device)).pow(2).sum())
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    return {"params": [p.detach().cpu().clone() for p in engine.module.parameters()], "norms": norms}


def test_training_trajectory_unchanged(dist_pool) -> None:
    pool = dist_pool(2)
    fused, own = pool.run(trajectory, True), pool.run(trajectory, False)
    for a, b in zip(fused, own):
        assert min(a["norms"]) > 0.05  # clipped every step
        assert a["norms"] == pytest.approx(b["norms"], rel=1e-6)
        for p, q in zip(a["params"], b["params"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
