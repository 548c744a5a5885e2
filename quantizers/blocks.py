"""Distillation blocks of a diffusers model (docs/design.md §3.5), found from the module tree.

A block is one module, called once per model forward, so that it can be run on its own from captured
inputs: a module of one of the diffusers block types (the time embedding, every ResnetBlock2D, every
attention / Transformer2DModel, every Down/Upsample, a transformer's patch embedding), a transformer block (an
element of a stack of blocks held by the model itself, `transformer_blocks`, `single_transformer_blocks`, ...,
that holds an attention module: DiT/PixArt's BasicTransformerBlock, SD3's JointTransformerBlock, Flux's two kinds,
found by what it is rather than by class name) or, outside those, a Conv2d/Linear (conv_in; conv_out or proj_out,
the output head; quantized or not, so a model and its quantized copy have the same blocks) or another
parameterised leaf. Only blocks holding a Conv2d or Linear are returned: norm leaves outside
blocks (conv_norm_out) and embeddings have nothing quantized, and stay as the FP model has them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

BLOCK_TYPES = (TimestepEmbedding, ResnetBlock2D, Transformer2DModel, Attention, Downsample2D, Upsample2D, PatchEmbed)
ATTENTION_TYPES = (Attention, AttentionModuleMixin)  # Flux's FluxAttention is not an `Attention`


@dataclass
class Block:
    """One distillation unit: a named module of the model."""

    name: str
    module: nn.Module


def block_output(out) -> torch.Tensor:
    """What a block's distillation target is: the tensor it returns (diffusers blocks return a tensor, a tuple or
    an output dataclass). A joint transformer block returns two streams, text and image (SD3, Flux): both count,
    each flattened per sample and concatenated, so the loss covers the text stream the next block reads."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        streams = [x for x in out if isinstance(x, torch.Tensor)]
        if len(streams) == 1 or len({x.shape[0] for x in streams}) > 1:
            return streams[0]
        return torch.cat([x.flatten(1) for x in streams], dim=1)
    return out.sample


def _transformer_block(module: nn.Module) -> bool:
    """A transformer block: holds an attention module and no UNet resnet (a UNet's down/up blocks hold both)."""
    kinds = [m for m in module.modules()]
    return any(isinstance(m, ATTENTION_TYPES) for m in kinds) and not any(isinstance(m, ResnetBlock2D) for m in kinds)


def find_blocks(model: nn.Module, example_inputs: dict | None = None) -> list[Block]:
    """Ordered distillation blocks of `model`.

    Without `example_inputs` the order is the module tree's; with them (kwargs for one forward) it is
    the order in which the blocks first run, which differs inside mid-blocks and cross-attention blocks
    (diffusers registers their attentions before their resnets).
    """
    found: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module, in_stack: bool = False) -> None:
        children = list(module.named_children())
        if isinstance(module, BLOCK_TYPES + (nn.Conv2d, nn.Linear)) or (in_stack and _transformer_block(module)) or (
                not children and any(True for _ in module.parameters(recurse=False))):
            found.append((name, module))
            return
        stack = module is not model and isinstance(module, nn.ModuleList) and "." not in name  # the model's own
        for child_name, child in children:
            visit(f"{name}.{child_name}" if name else child_name, child, stack)

    visit("", model)
    blocks = [Block(name, module) for name, module in found
              if any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())]

    if example_inputs is not None:
        order: dict[int, int] = {}

        def first_call(key):
            def hook(module, args):
                order.setdefault(key, len(order))  # returns None: the inputs are left alone
            return hook

        hooks = [b.module.register_forward_pre_hook(first_call(id(b))) for b in blocks]
        try:
            with torch.no_grad():
                model(**example_inputs)
        finally:
            for h in hooks:
                h.remove()
        blocks.sort(key=lambda b: order.get(id(b), len(order)))
    return blocks
