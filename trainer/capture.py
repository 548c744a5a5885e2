"""Capturing a block's call from the live model: its inputs (and the block's output) for a batch of model
inputs, by a forward pre-hook that stops the forward once the block has been seen (docs/design.md §3.5: hooks on
the model, never re-implementations of diffusers' forwards); and blocks whose calls return given outputs
without running, so that the forward up to a block costs the model's code between blocks, not the blocks."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..quantizers import block_output


class _Stop(Exception):
    """Raised by a hook to end a forward once the block of interest has been seen."""


@torch.no_grad()
def capture_block_call(model: nn.Module, block: nn.Module, model_kwargs: dict, with_output: bool) -> dict:
    """Run `model(**model_kwargs)` until `block` is called; return its args, kwargs and, if asked, its
    output (`output`: the tensor, `full_output`: what the block returned). The rest of the forward is skipped."""
    seen: dict = {}

    def pre(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        if not with_output:
            raise _Stop

    def post(module, args, kwargs, output):
        seen["full_output"] = output
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


@contextlib.contextmanager
def substituted(outputs: dict[nn.Module, object]):
    """Inside, a call of each module in `outputs` returns its given output without running its forward (hooks
    registered on the module still run)."""
    saved = {}
    for module, output in outputs.items():
        saved[module] = module.__dict__.get("forward")
        module.forward = _Returns(output)
    try:
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


class _Returns:
    def __init__(self, output):
        self.output = output

    def __call__(self, *args, **kwargs):
        return self.output


class BlockCalls:
    """Counts the calls of `modules` that ran their forward to the end (substituted ones are not counted)."""

    def __init__(self, modules: list[nn.Module]):
        self.modules, self.calls, self.handles = modules, 0, []

    def _hook(self, module, args, output):
        if not isinstance(module.__dict__.get("forward"), _Returns):
            self.calls += 1

    def __enter__(self):
        # registered before capture's own hooks, so a call that capture stops right after is counted
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
