"""Capturing a block's call from the live model: its inputs (and the FP block's output) for a batch of model
inputs, by a forward pre-hook that stops the forward once the block has been seen (DESIGN.md §3.5: hooks on
the model, never re-implementations of diffusers' forwards), and the per-block cache of all of a rank's rows."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..quantizers import block_output


class _Stop(Exception):
    """Raised by a hook to end a forward once the block of interest has been seen."""


@torch.no_grad()
def capture_block_call(model: nn.Module, block: nn.Module, model_kwargs: dict, with_output: bool) -> dict:
    """Run `model(**model_kwargs)` until `block` is called; return its args, kwargs and, if asked, its
    output. The rest of the forward is skipped."""
    seen: dict = {}

    def pre(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        if not with_output:
            raise _Stop

    def post(module, args, kwargs, output):
        seen["output"] = block_output(output)
        raise _Stop

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True)]
    if with_output:
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        model(**model_kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "args" not in seen:
        raise RuntimeError(f"block {type(block).__name__} was not called by the model's forward")
    # diffusers' attention returns channels_last views; GroupNorm's CPU backward on a channels_last input
    # crashes (segfault, torch 2.13), and the block is trained from these tensors: store them contiguous.
    leaves, spec = tree_flatten((seen["args"], seen["kwargs"]))
    seen["args"], seen["kwargs"] = tree_unflatten(
        [x.contiguous() if isinstance(x, torch.Tensor) else x for x in leaves], spec)
    return seen


class RowCache:
    """One block's captured calls for all of this rank's rows. Tensors whose batch dimension is the model
    batch (rows × `fold`, the fold being 2 for guidance batches) are stored as [fold, rows, ...] so any
    selection of rows can be reassembled; everything else is kept from the first chunk."""

    def __init__(self, chunks: list[dict], rows_per_chunk: list[int]):
        spec = None
        columns: list[list] = []
        self.batched: list[bool] = []
        for chunk, rows in zip(chunks, rows_per_chunk):
            leaves, spec = tree_flatten(chunk)
            fold = chunk["t"].shape[0] // rows
            if not columns:
                columns = [[] for _ in leaves]
                self.batched = [isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows * fold
                                for x in leaves]
                self.fold = fold
            for col, leaf, batched in zip(columns, leaves, self.batched):
                col.append(leaf.unflatten(0, (fold, rows)) if batched else leaf)
        self.spec = spec
        self.leaves = [torch.cat(col, dim=1) if batched else col[0] for col, batched in zip(columns, self.batched)]

    def select(self, rows: torch.Tensor) -> dict:
        leaves = [x[:, rows].flatten(0, 1) if batched else x for x, batched in zip(self.leaves, self.batched)]
        return tree_unflatten(leaves, self.spec)

    @staticmethod
    def nbytes(chunk: dict) -> int:
        return sum(x.numel() * x.element_size() for x in tree_flatten(chunk)[0] if isinstance(x, torch.Tensor))
