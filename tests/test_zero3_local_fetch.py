"""train/zero3_local_fetch.py: ZeRO-3 on one rank trains exactly as DeepSpeed's own path, without its host
synchronisation per fetch.

On CPU DeepSpeed never synchronises (its CPU accelerator resolves data dependencies), so the GPU's
behaviour is reproduced by an accelerator that reports it does not (`resolves_data_dependency` False) and
counts `current_stream().synchronize()` (tests/test_gpu.py runs the same functions on CUDA, counting the
real synchronisations): DeepSpeed's path calls it for every fetch or prefetch handle,
ours not once (counted in forward; backward fetches the same way). Trajectories (parameters after 3
clipped AdamW steps, bf16 and fp32) are compared bit for bit with the switch off, on 1 rank where the
fast path is taken and on 2 ranks where real all-gathers run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from train.config import OptimConfig, ZeroConfig

LAYERS, WIDTH, BATCH = 6, 8, 4


def make_backbone() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH))])


class CountingStream:
    """What a GPU stream offers the coordinator, counting host synchronisations."""

    def __init__(self) -> None:
        self.synchronizations = 0

    def synchronize(self) -> None:
        self.synchronizations += 1

    def wait_stream(self, other: Any) -> None:  # a GPU-side dependency, no host stall
        pass


@contextlib.contextmanager
def counted_host_synchronizations() -> Iterator[Any]:
    """Count stream synchronisations: on a GPU the real ones (torch.cuda.Stream.synchronize), on CPU those
    of an accelerator made to behave as a GPU's does (see unsynchronized_accelerator)."""
    if not torch.cuda.is_available():
        with unsynchronized_accelerator() as stream:
            yield stream
        return
    counter = CountingStream()
    original = torch.cuda.Stream.synchronize

    def counting(self: Any) -> None:
        counter.synchronizations += 1
        original(self)

    torch.cuda.Stream.synchronize = counting  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        torch.cuda.Stream.synchronize = original  # type: ignore[method-assign]


@contextlib.contextmanager
def unsynchronized_accelerator() -> Iterator[CountingStream]:
    """DeepSpeed's CPU accelerator behaving as a GPU's does for data dependencies (the host must wait)."""
    from deepspeed.accelerator import get_accelerator

    accelerator, stream = get_accelerator(), CountingStream()
    saved = {name: getattr(accelerator, name) for name in ("resolves_data_dependency", "current_stream")}
    accelerator.resolves_data_dependency = lambda: False  # type: ignore[method-assign]
    accelerator.current_stream = lambda device_index=None: stream  # type: ignore[method-assign]
    try:
        yield stream
    finally:
        for name, fn in saved.items():
            setattr(accelerator, name, fn)


def trajectory(skip_sync: bool, bf16: bool, steps: int = 3) -> dict[str, Any]:
    import deepspeed
    import torch.distributed as dist

    from train import zero3_local_fetch
    from train.engine import build_engine

    rank = dist.get_rank()
    engine = build_engine(
        make_backbone(),
        OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.05),
        ZeroConfig(
            stage=3,
            bf16=bf16,
            stage3_skip_local_fetch_sync=skip_sync,
            stage3_param_persistence_threshold=0,  # every parameter partitioned, as ViT-L's matrices are
            stage3_prefetch_bucket_size=WIDTH * WIDTH,  # prefetch about one Linear ahead, as ViT-L's 5e7 does
        ),
        micro_batch=BATCH,
        max_steps=10,
    )
    handles = 0
    original_init = zero3_local_fetch.LocalPartitionHandle.__init__

    def counting_init(self: Any, params: list[Any]) -> None:
        nonlocal handles
        handles += 1
        original_init(self, params)

    zero3_local_fetch.LocalPartitionHandle.__init__ = counting_init  # type: ignore[method-assign]
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        synchronizations = 0
        for step in range(steps):
            g = torch.Generator().manual_seed(100 * step + rank)
            # forward only: on CPU, DeepSpeed's backward would need more of a GPU's stream API than is mocked
            with counted_host_synchronizations() as stream:
                out = engine(torch.randn(BATCH, WIDTH, generator=g).to(engine.device, dtype))
            synchronizations += stream.synchronizations
            engine.backward(out.float().pow(2).sum())
            engine.step()
    finally:
        zero3_local_fetch.LocalPartitionHandle.__init__ = original_init  # type: ignore[method-assign]
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = [p.detach().float().cpu().clone() for p in engine.module.parameters()]
    return {"params": params, "synchronizations": synchronizations, "local_handles": handles}


@pytest.mark.parametrize("bf16", [False, True])
def test_one_rank_trains_identically_without_host_synchronisation(dist_pool, bf16: bool) -> None:
    pool = dist_pool(1)
    (ours,) = pool.run(trajectory, True, bf16)
    (deepspeeds,) = pool.run(trajectory, False, bf16)
    # DeepSpeed's path: a host synchronisation for every fetch or prefetch handle, at least one per Linear
    # in each of the 3 forwards
    assert deepspeeds["synchronizations"] >= 3 * LAYERS, deepspeeds["synchronizations"]
    assert deepspeeds["local_handles"] == 0
    assert ours["synchronizations"] == 0 and ours["local_handles"] >= 3 * LAYERS
    for p, q in zip(ours["params"], deepspeeds["params"]):
        assert torch.equal(p, q)
    assert not torch.equal(ours["params"][0], make_backbone()[0].weight.float())  # it trained


def test_two_ranks_gather_as_before(dist_pool) -> None:
    """With 2 ranks every parameter is all-gathered: the switch changes nothing, bit for bit."""
    pool = dist_pool(2)
    ours, deepspeeds = pool.run(trajectory, True, False), pool.run(trajectory, False, False)
    for a, b in zip(ours, deepspeeds):
        assert a["local_handles"] == 0
        for p, q in zip(a["params"], b["params"]):
            assert torch.equal(p, q)


def resumed_step(tmp: str) -> list[torch.Tensor]:
    """Train 2 steps, save, load into a fresh engine and take a third step there (fast path on)."""
    import deepspeed

    from train.engine import build_engine

    def engine() -> Any:
        return build_engine(
            make_backbone(),
            OptimConfig(lr=1e-2, warmup_steps=0),
            ZeroConfig(stage=3, stage3_param_persistence_threshold=0),
            micro_batch=BATCH,
            max_steps=10,
        )

    def step(e: Any, seed: int) -> None:
        x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(seed)).to(e.device)
        e.backward(e(x).pow(2).sum())
        e.step()

    first = engine()
    for seed in range(3):
        if seed == 2:
            first.save_checkpoint(tmp, tag="t")
            second = engine()
            second.load_checkpoint(tmp, tag="t")
            step(second, seed)
        step(first, seed)
    out = []
    for e in (first, second):
        with deepspeed.zero.GatheredParameters(list(e.module.parameters())):
            out.append(torch.cat([p.detach().flatten().cpu().clone() for p in e.module.parameters()]))
    return out


def test_checkpoint_round_trip_on_one_rank(dist_pool, tmp_path) -> None:
    (trained, resumed) = dist_pool(1).run(resumed_step, str(tmp_path))[0]
    assert torch.equal(trained, resumed)
