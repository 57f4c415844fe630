"""model.compile: torch.compile of the trunk's blocks (train/blocks.compile_trunk).

The compiled trunk must train as the eager one does (fp32, up to kernel rounding), on 1 rank and 2, at ZeRO-2
and at ZeRO-3 with leaf blocks (with activation checkpointing, whose backward runs each block again), while
dynamo builds one graph that every block reuses, with no graph break: compiling the whole module, as
DeepSpeed's engine.compile() does, traced ZeRO-3's hooks and broke the graph at each of them. The graph counts
are the checks that a block ran compiled (a block past dynamo's limit keeps its compiled wrapper but runs
eagerly).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model.config import ModelConfig
from train.config import OptimConfig, ZeroConfig

STEPS, BATCH, SIZE = 3, 4, 32


def fresh_dynamo() -> None:
    """No graphs, counts or raised limits from an earlier test in this pool process (compile_trunk raises
    dynamo's process-wide limits; the graph counts below are the checks)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch._dynamo.config.recompile_limit = 8  # dynamo's defaults
    torch._dynamo.config.accumulated_recompile_limit = 256


def trajectory(stage: int, grad_checkpointing: bool, scope: str) -> dict[str, Any]:
    """An eval forward of a 2-block ViT (compiled with `scope`, "" = eager) at one batch size, the losses of
    STEPS fp32 training steps at another, and dynamo's graph and graph-break counts."""
    import timm
    import torch._dynamo
    from torch._dynamo.utils import counters

    from train.engine import build_engine

    fresh_dynamo()
    torch.manual_seed(0)
    net = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE, patch_size=8, depth=2
    )
    net.set_grad_checkpointing(grad_checkpointing)
    zero = ZeroConfig(stage=stage, bf16=False)
    optim = OptimConfig(warmup_steps=0, grad_clip=1.0)
    engine = build_engine(net, optim, zero, micro_batch=BATCH, max_steps=10, compile_scope=scope)
    g = torch.Generator().manual_seed(1)
    engine.eval()
    with torch.no_grad():  # first, while the weights are the same (AdamW makes rounding-level gradient
        evaluated = engine(torch.randn(BATCH + 3, 3, SIZE, SIZE, generator=g))  # differences into lr-size ones)
    engine.train()
    losses = []
    for _ in range(STEPS):
        loss = engine(torch.randn(BATCH, 3, SIZE, SIZE, generator=g)).square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {
        "losses": losses,
        "eval": evaluated.detach().clone(),
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
        "compiled_blocks": sum(hasattr(b.forward, "_torchdynamo_orig_callable") for b in net.blocks),
    }


def _eager_and_compiled(stage: int, grad_checkpointing: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    both = trajectory(stage, grad_checkpointing, ""), trajectory(stage, grad_checkpointing, "blocks")
    fresh_dynamo()  # the later tests of this pool process see no compiled state (fake tensors in gc)
    return both


# ZeRO-2 on one rank (its hooks are gradient hooks, whatever the ranks), ZeRO-3 on one (our local fetch path)
# and two (real all-gathers around the compiled blocks)
@pytest.mark.parametrize("world, stage, grad_checkpointing", [(1, 2, False), (1, 3, True), (2, 3, True)])
def test_compiled_blocks_train_as_eager_with_one_graph(
    dist_pool, world: int, stage: int, grad_checkpointing: bool
) -> None:
    for eager, compiled in dist_pool(world).run(_eager_and_compiled, stage, grad_checkpointing):
        assert eager["graphs"] == 0 and compiled["compiled_blocks"] == 2
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
        torch.testing.assert_close(compiled["eval"], eager["eval"], rtol=1e-4, atol=1e-5)
        # one graph for both blocks in the no-grad evaluation, one more for training; nothing broke them
        assert compiled["graphs"] == 2 and compiled["breaks"] == 0, (compiled["graphs"], compiled["breaks"])


def test_blocks_that_differ_each_get_a_graph_past_dynamos_default_limit(dist_pool) -> None:
    """Blocks that differ in a float (here each block's dropout rate) compile a graph each: 9 blocks, 9 graphs; at
    dynamo's default limit of 8 the ninth block ran eagerly."""
    (graphs, compiled, _), *_ = dist_pool(1).run(_block_graphs, 2, "dropout")
    assert compiled == 9 and graphs == 9, graphs


def test_drop_path_rates_share_one_graph(dist_pool) -> None:
    """timm's drop-path rate grows block by block (0 for the first, which holds no DropPath): as floats they
    compiled 9 graphs for 9 blocks; as tensors (SharedGraphDropPath) two, also through ZeRO-3's leaf blocks;
    the state dict keeps its keys."""
    for stage in (2, 3):
        (graphs, compiled, replaced), *_ = dist_pool(1).run(_block_graphs, stage, "drop_path")
        assert compiled == 9 and replaced == 16 and graphs == 2, (stage, graphs, replaced)


def _block_graphs(stage: int, differ_by: str) -> tuple[int, int, int]:
    """One training step of a 9-block ViT-Ti whose blocks differ by `differ_by`, compiled by blocks: how many
    graphs dynamo built, how many blocks it compiled, how many DropPaths compile_trunk replaced."""
    import timm
    import torch._dynamo
    from torch._dynamo.utils import counters

    from train.blocks import SharedGraphDropPath, compile_trunk
    from train.engine import build_engine

    fresh_dynamo()
    net = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        img_size=16,
        patch_size=8,
        depth=9,
        drop_path_rate=0.1 if differ_by == "drop_path" else 0.0,
    )
    if differ_by == "dropout":
        for i, block in enumerate(net.blocks):
            block.attn.proj_drop.p = 0.01 * i
    engine = build_engine(net, OptimConfig(warmup_steps=0), ZeroConfig(stage=stage), micro_batch=2, max_steps=5)
    saved_keys = list(engine.module.state_dict())
    compile_trunk(engine, "blocks")
    # checkpoints of compiled and eager runs load into each other (the shared rates are non-persistent)
    assert list(engine.module.state_dict()) == saved_keys
    engine.backward(engine(torch.randn(2, 3, 16, 16)).square().mean())
    engine.step()
    compiled = sum(hasattr(b.forward, "_torchdynamo_orig_callable") for b in net.blocks)
    replaced = sum(isinstance(m, SharedGraphDropPath) for m in net.modules())
    graphs = counters["stats"]["unique_graphs"]
    fresh_dynamo()
    return graphs, compiled, replaced


def test_checkpointed_compiled_blocks_draw_the_same_drop_paths_again(dist_pool) -> None:
    """The ViT-L recipes' setting: compiled blocks, drop path, activation checkpointing. The backward's recompute
    of each block must draw the masks its forward drew: the gradients equal those of the same compiled trunk
    without checkpointing (drop rate 0.5: a wrong mask would change them)."""
    (plain, checkpointed), *_ = dist_pool(1).run(_drop_path_gradients)
    assert plain[0] == checkpointed[0]
    torch.testing.assert_close(checkpointed[1], plain[1], rtol=0, atol=0)


def _drop_path_gradients() -> tuple[tuple[float, torch.Tensor], tuple[float, torch.Tensor]]:
    import timm

    from train.blocks import share_drop_path_graphs

    runs = []
    for checkpointing in (False, True):
        fresh_dynamo()
        torch.manual_seed(0)
        net = timm.create_model(
            "vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=8, depth=3, drop_path_rate=0.5
        )
        net.set_grad_checkpointing(checkpointing)
        assert share_drop_path_graphs(list(net.blocks)) == 4  # blocks 1 and 2, two drop paths each
        for block in net.blocks:
            block.forward = torch.compile(block.forward)
        x = torch.randn(16, 3, 16, 16)
        torch.manual_seed(1)
        loss = net(x).square().mean()
        loss.backward()
        runs.append((loss.item(), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])))
    fresh_dynamo()
    return runs[0], runs[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_graph_drop_path_drops_and_scales_as_timms(dtype: torch.dtype) -> None:
    from timm.layers import DropPath

    from train.blocks import SharedGraphDropPath

    x = torch.ones(40_000, 3, 2, dtype=dtype)
    for scale_by_keep in (True, False):
        ours, timms = SharedGraphDropPath(0.25, scale_by_keep, x.device), DropPath(0.25, scale_by_keep)
        torch.manual_seed(0)
        got, want = ours(x), timms(x)
        assert got.dtype == dtype and ours.keep_prob.dtype == torch.float32
        kept = (got[:, 0, 0] != 0).double().mean().item()
        assert abs(kept - 0.75) < 4 * (0.75 * 0.25 / 40_000) ** 0.5  # each sample kept with 1 - p
        assert torch.equal(got.amax(dim=(1, 2)), got.amin(dim=(1, 2)))  # a whole sample at once
        assert set(got.unique().tolist()) == set(want.unique().tolist())  # 0 and timm's 1 / (1 - p), rounded alike
    ours.eval()
    assert ours(x) is x


def test_compile_scope_model_and_trunks_without_blocks_compile_the_whole_trunk(dist_pool) -> None:
    (vit, resnet), *_ = dist_pool(1).run(_whole_trunk_compiles)
    assert vit == "model.compile (compile_scope=model): compiles the whole trunk (DeepSpeed's engine.compile())"
    assert resnet == (
        "model.compile (compile_scope=blocks): compiles the whole trunk (DeepSpeed's engine.compile(): "
        "ResNet holds no `blocks` container)"
    )


def _whole_trunk_compiles() -> tuple[str, str]:
    """What build_engine tells the user it compiled, for a ViT at scope "model" and a ResNet at "blocks"."""
    import contextlib
    import io

    import timm

    from train.engine import build_engine

    described = []
    for name, scope in (("vit_tiny_patch16_224", "model"), ("resnet10t", "blocks")):
        net = timm.create_model(name, pretrained=False, num_classes=0)
        eager_keys = list(net.state_dict())
        with contextlib.redirect_stdout(io.StringIO()) as out:
            engine = build_engine(
                net, OptimConfig(warmup_steps=0), ZeroConfig(stage=2), micro_batch=2, max_steps=5, compile_scope=scope
            )
        assert engine.is_compiled  # DeepSpeed's own compile ran (compiling happens at the first call)
        assert list(engine.module.state_dict()) == eager_keys  # no "_orig_mod." prefix: checkpoints load either way
        described.append(next(line for line in out.getvalue().splitlines() if line.startswith("model.compile")))
    fresh_dynamo()
    return described[0], described[1]


def test_compile_scope_is_validated() -> None:
    with pytest.raises(ValueError, match="model.compile_scope='layers' must be one of blocks, model"):
        ModelConfig(compile_scope="layers").validate()
