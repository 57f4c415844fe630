"""The trunk's repeated blocks, and what is done block by block: ZeRO-3 leaf modules and torch.compile.

timm trunks keep their repeated unit in a `blocks` container (ViT's transformer blocks, Swin's and ConvNeXt's
stage blocks). ZeRO-3 fetches each as one unit (zero.stage3_leaf_blocks) and model.compile compiles each one's
forward, which blocks alike share (model.compile_scope=blocks).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn


def _holds_blocks(module: nn.Module) -> bool:
    return isinstance(getattr(module, "blocks", None), (nn.Sequential, nn.ModuleList))


def trunk_blocks(module: nn.Module) -> list[nn.Module]:
    """The items of every `blocks` container (nn.Sequential / nn.ModuleList) in `module`, innermost only: timm's
    transformer stacks (ViT, DeiT, EVA), Swin's and ConvNeXt's stage blocks, EfficientNet's stages; none for
    trunks without one (ResNets). Left out: items that are containers themselves (Twins keeps ModuleLists it
    never calls) and items holding `blocks` of their own (CrossViT's multi-scale blocks): as leaves both broke
    DeepSpeed's ZeRO-3 step ("unknown parameter type")."""
    found: list[nn.Module] = []
    for sub in module.modules():
        if _holds_blocks(sub):
            found.extend(b for b in getattr(sub, "blocks") if not isinstance(b, (nn.ModuleList, nn.ModuleDict)))
    return [b for b in found if not any(_holds_blocks(m) for m in b.modules())]


def mark_leaf_blocks(module: nn.Module) -> int:
    """Flag each trunk block as a ZeRO-3 leaf module: DeepSpeed then fetches and releases the block's parameters
    from hooks on the block alone, not on each of its submodules (zero.stage3_leaf_blocks). How many blocks."""
    from deepspeed.utils import set_z3_leaf_module

    blocks = trunk_blocks(module)
    for block in blocks:
        set_z3_leaf_module(block, True)
    return len(blocks)


def compile_trunk(engine: Any, scope: str) -> str:
    """torch.compile the engine's trunk (model.compile); returns what it compiled.

    scope "blocks": each trunk block's `forward` (`trunk_blocks`). A ViT's blocks share one code object and
    their shapes, so one graph serves all of them (a 24-block ViT-L compiles one block, not the model), and
    the module hooks, run by the block's `__call__` outside its `forward`, stay eager: ZeRO-3 fetches and
    releases a leaf block around the compiled graph. Compiling the whole trunk instead ("model", DeepSpeed's
    `engine.compile()`, also what trunks without blocks get) traces the hooks too: at ZeRO-3 every hook broke
    the graph (ViT-Ti, 4 blocks: 11 graphs, 41 breaks, dynamo's recompile limit hit; "blocks": one graph, no
    break). ZeRO-3 without leaf blocks hooks every submodule inside a block: graph breaks at each either way.

    Blocks that differ in a Python constant get a graph each (Swin alternates its window shifts), and each may
    need a no-grad one for evaluation and a dynamic-batch one: past dynamo's limit of 8 graphs per function the
    remaining blocks ran eagerly, so the limit covers 4 per block. timm's drop-path rate, which grows block by
    block, no longer makes one: `share_drop_path_graphs` holds it in a tensor.
    """
    blocks = trunk_blocks(engine.module) if scope == "blocks" else []
    if not blocks:
        engine.compile()
        why = "" if scope == "model" else f": {type(engine.module).__name__} holds no `blocks` container"
        return f"the whole trunk (DeepSpeed's engine.compile(){why})"
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 4 * len(blocks))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 8 * len(blocks))
    share_drop_path_graphs(blocks)
    for block in blocks:
        block.forward = torch.compile(block.forward)  # an instance attribute: __call__ and its hooks stay eager
    return f"each of the trunk's {len(blocks)} blocks"


class SharedGraphDropPath(nn.Module):
    """timm's DropPath (stochastic depth: each sample's residual branch dropped with probability p, the kept ones
    scaled by 1 / (1 - p)) with 1 - p held in a 0-d fp32 buffer, not a Python float.

    torch.compile specialises a graph on a module's float attributes, and timm gives each block its own rate
    (linearly up to model.drop_path_rate): a 24-block ViT-L compiled 23 block graphs. As a tensor the rate is
    an input of one shared graph. Non-persistent: checkpoints are unchanged. In evaluation, the identity.
    """

    keep_prob: torch.Tensor

    def __init__(self, drop_prob: float, scale_by_keep: bool, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob, device=device), persistent=False)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(self.keep_prob)
        return x * (mask / self.keep_prob if self.scale_by_keep else mask)  # a 0-d divisor keeps x's dtype


def share_drop_path_graphs(blocks: list[nn.Module]) -> int:
    """Replace the timm DropPath modules with a rate inside `blocks` by SharedGraphDropPath (after DeepSpeed's
    cast and move: the rate stays fp32, on the block's device); how many were replaced."""
    from timm.layers import DropPath

    replaced = 0
    for block in blocks:
        device = next(itertools.chain(block.parameters(), block.buffers()), torch.empty(0)).device
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is DropPath and child.drop_prob > 0:
                    setattr(parent, name, SharedGraphDropPath(child.drop_prob, child.scale_by_keep, device))
                    replaced += 1
    return replaced
