"""zero.stage3_leaf_blocks: ZeRO-3 fetches each trunk block as one unit (DeepSpeed's z3 leaf modules).

The switch may only change how often DeepSpeed's hooks run, never what is computed: a small timm ViT (with and
without activation checkpointing, whose backward runs each block's forward again) trains bit for bit as with
the switch off, on 1 rank (our local fetch path) and 2 (real all-gathers), while the coordinator's
fetch_sub_module runs once per block instead of once per submodule.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from train.config import OptimConfig, ZeroConfig

STEPS, BATCH, SIZE = 3, 4, 32


def trajectory(leaf_blocks: bool, grad_checkpointing: bool) -> dict[str, Any]:
    """Losses and parameters after STEPS bf16 ZeRO-3 steps of a 2-block ViT, and how many fetches ran."""
    import timm
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    from train.engine import build_engine

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE, depth=2)
    net.set_grad_checkpointing(grad_checkpointing)
    zero = ZeroConfig(stage=3, bf16=True, stage3_leaf_blocks=leaf_blocks, stage3_param_persistence_threshold=0)
    engine = build_engine(net, OptimConfig(warmup_steps=0, grad_clip=1.0), zero, micro_batch=BATCH, max_steps=10)
    fetches = [0]
    original = PartitionedParameterCoordinator.fetch_sub_module

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        fetches[0] += 1
        return original(self, *args, **kwargs)

    PartitionedParameterCoordinator.fetch_sub_module = counted  # type: ignore[method-assign]
    try:
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(STEPS):
            x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(engine.device, torch.bfloat16)  # engines move nothing
            loss = engine(x).float().square().mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    finally:
        PartitionedParameterCoordinator.fetch_sub_module = original  # type: ignore[method-assign]
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        # on the host: CUDA tensors cannot travel on from the Manager process that receives them (tests/test_gpu.py)
        params = [p.detach().float().cpu().clone() for p in engine.module.parameters()]
    leaves = sum(getattr(m, "_z3_leaf", False) for m in engine.module.modules())
    return {"losses": losses, "params": params, "fetches": fetches[0], "leaves": leaves}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_leaf_blocks_train_bit_for_bit_with_fewer_fetches(dist_pool, world: int, grad_checkpointing: bool) -> None:
    for leaf, plain in dist_pool(world).run(_both_ranked, grad_checkpointing):
        assert leaf["leaves"] == 2 and plain["leaves"] == 0
        assert leaf["losses"] == plain["losses"]
        for a, b in zip(leaf["params"], plain["params"]):
            assert torch.equal(a, b)
        # a ViT block hooks norm1, attn (qkv, proj), norm2, mlp (fc1, fc2) and more; as a leaf only itself
        assert leaf["fetches"] * 3 < plain["fetches"], (leaf["fetches"], plain["fetches"])


def _both_ranked(grad_checkpointing: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    return trajectory(True, grad_checkpointing), trajectory(False, grad_checkpointing)


def _leaves_and_a_step(name: str, size: int) -> tuple[int, float]:
    import timm

    from train.engine import build_engine

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=0, img_size=size)
    engine = build_engine(net, OptimConfig(warmup_steps=0), ZeroConfig(stage=3, bf16=True), micro_batch=2, max_steps=5)
    loss = engine(torch.randn(2, 3, size, size).bfloat16()).float().square().mean()
    engine.backward(loss)
    engine.step()
    return sum(getattr(m, "_z3_leaf", False) for m in engine.module.modules()), loss.item()


@pytest.mark.parametrize("name, size, leaves", [("twins_svt_small", 64, 0), ("crossvit_tiny_240", 240, 6)])
def test_blocks_of_blocks_leave_only_called_innermost_leaves(dist_pool, name: str, size: int, leaves: int) -> None:
    """Twins' `blocks` holds ModuleLists it never calls, CrossViT's blocks hold `blocks` of their own: flagged as
    leaves, DeepSpeed's ZeRO-3 step failed ("unknown parameter type"); only called, innermost blocks are."""
    (found, loss), *_ = dist_pool(1).run(_leaves_and_a_step, name, size)
    assert found == leaves and loss == loss  # a step ran, its loss is a number
