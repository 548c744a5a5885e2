"""Distillation blocks of a diffusers model (DESIGN.md §3.5), found from the module tree.

A block is a module of one of the diffusers block types (the time embedding, every ResnetBlock2D,
every attention / Transformer2DModel, every Down/Upsample) or, outside those, a parameterised leaf
(conv_in, conv_out); a parameterised norm leaf joins the block after it (conv_norm_out + conv_out is
the output head). Only blocks holding a Conv2d or Linear are returned: the rest has nothing to learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

BLOCK_TYPES = (TimestepEmbedding, ResnetBlock2D, Transformer2DModel, Attention, Downsample2D, Upsample2D)
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


@dataclass
class Block:
    """One distillation unit: its input is the first module's input, its output the last one's output."""

    name: str
    modules: list[tuple[str, nn.Module]]

    @property
    def first(self) -> nn.Module:
        return self.modules[0][1]

    @property
    def last(self) -> nn.Module:
        return self.modules[-1][1]

    def parameters(self):
        for _, m in self.modules:
            yield from m.parameters()


def find_blocks(model: nn.Module, example_inputs: dict | None = None) -> list[Block]:
    """Ordered distillation blocks of `model`.

    Without `example_inputs` the order is the module tree's; with them (kwargs for one forward) it is
    the order in which the blocks first run, which differs inside mid-blocks and cross-attention blocks
    (diffusers registers their attentions before their resnets).
    """
    found: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module) -> None:
        children = list(module.named_children())
        if isinstance(module, BLOCK_TYPES) or (not children and any(True for _ in module.parameters(recurse=False))):
            found.append((name, module))
            return
        for child_name, child in children:
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)

    blocks: list[Block] = []
    pending: list[tuple[str, nn.Module]] = []  # norm leaves waiting for the block they feed
    for name, module in found:
        if isinstance(module, NORM_TYPES):
            pending.append((name, module))
            continue
        members = pending + [(name, module)]
        pending = []
        if any(isinstance(m, (nn.Conv2d, nn.Linear)) for _, mod in members for m in mod.modules()):
            blocks.append(Block(name, members))

    if example_inputs is not None:
        order: dict[int, int] = {}

        def first_call(key):
            def hook(module, args):
                order.setdefault(key, len(order))  # returns None: the inputs are left alone
            return hook

        hooks = [b.first.register_forward_pre_hook(first_call(id(b))) for b in blocks]
        try:
            with torch.no_grad():
                model(**example_inputs)
        finally:
            for h in hooks:
                h.remove()
        blocks.sort(key=lambda b: order.get(id(b), len(order)))
    return blocks
