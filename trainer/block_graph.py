"""Which earlier blocks' outputs each block's call reads, found once by following the dataflow of one forward.

Block k's inputs are computed from the model inputs and from the outputs of blocks before it, through the
model's own code between blocks (skip stacks, concatenations, the time embedding handed to every resnet). A
torch-function mode labels every tensor with the blocks its value came from: a block's output carries its own
label, every other op's output the union of its inputs' labels (an in-place op adds them to the tensor it
writes). Block k reads the blocks in the labels of its call's arguments. This is what lets capture carry block
outputs forward instead of re-running the prefix (trainer/block_inputs.py), without knowing the model's code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..denoisers import latent_name
from ..lineage import Lineage


@dataclass
class OutputLayout:
    """The structure of a block's output for one model batch: its pytree spec and, per leaf, the shape after the
    batch dimension, the dtype and whether it is batched (non-tensor leaves are kept as they are)."""

    spec: object
    leaves: list

    def placeholder(self, batch: int, device: torch.device):
        """Zeros with the layout of the output for a model batch of `batch` (for a block whose output the
        block being captured does not read: the forward needs a value of the right shape, not its content)."""
        return tree_unflatten([torch.zeros((batch, *leaf[0]) if leaf[2] else leaf[0], dtype=leaf[1], device=device)
                               if isinstance(leaf, tuple) else leaf for leaf in self.leaves], self.spec)


@dataclass
class BlockGraph:
    """`reads[k]`: the blocks before k whose outputs block k's call reads; `layouts[k]`: block k's output layout."""

    reads: list[frozenset[int]]
    layouts: list[OutputLayout]

    def last_reader(self, j: int) -> int:
        """The last block that reads block j's output (j itself when none does)."""
        return max([k for k, r in enumerate(self.reads) if j in r], default=j)


@torch.no_grad()
def trace_block_graph(model: nn.Module, blocks: list[nn.Module], model_kwargs: dict) -> BlockGraph | None:
    """The block graph of `model` on one forward of `model_kwargs`, or None when the blocks are not called once
    each in list order (then no block can be captured from carried outputs)."""
    mode, order, reads, layouts = Lineage(), [], {}, {}
    batch = model_kwargs[latent_name(model)].shape[0]

    def pre(k):
        def hook(module, args, kwargs):
            order.append(k)
            reads[k] = frozenset(j for j in mode.of((args, kwargs)) if j < k)
        return hook

    def post(k):
        def hook(module, args, kwargs, output):
            leaves, spec = tree_flatten(output)
            layouts[k] = OutputLayout(spec, [
                (tuple(x.shape[1:]) if x.dim() and x.shape[0] == batch else tuple(x.shape), x.dtype,
                 bool(x.dim() and x.shape[0] == batch)) if isinstance(x, torch.Tensor) else x for x in leaves])
            mode.mark(output, frozenset((k,)), replace=True)
        return hook

    handles = []
    for k, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre(k), with_kwargs=True))
        handles.append(block.register_forward_hook(post(k), with_kwargs=True))
    try:
        with mode:
            model(**model_kwargs)
    finally:
        for h in handles:
            h.remove()
    if order != list(range(len(blocks))):
        return None
    return BlockGraph([reads[k] for k in order], [layouts[k] for k in order])
