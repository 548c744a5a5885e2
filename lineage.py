"""Value provenance through one forward: a torch-function mode that labels tensors with the set of sources
(blocks, or the latent input) their values derive from. The trainer's block graph (trainer/block_graph.py) and the
layer roles of quantizers/layer_precision.py both follow a forward with it, without knowing the model's code."""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class Lineage(TorchFunctionMode):
    """Labels tensors with the set of blocks their values derive from."""

    def __init__(self):
        super().__init__()
        self.labels = WeakIdKeyDictionary()

    def of(self, tree) -> frozenset[int]:
        found: set[int] = set()
        for x in tree_leaves(tree):
            if isinstance(x, torch.Tensor):
                found |= self.labels.get(x, frozenset())
        return frozenset(found)

    def mark(self, tree, labels: frozenset[int], replace: bool = False) -> None:
        for x in tree_leaves(tree):
            if isinstance(x, torch.Tensor):
                self.labels[x] = labels if replace else self.labels.get(x, frozenset()) | labels

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        labels = self.of((args, kwargs))
        if labels:
            self.mark(out, labels)
            name = getattr(func, "__name__", "")
            if args and isinstance(args[0], torch.Tensor) and (name.endswith("_") or name in (
                    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__")):
                self.mark(args[0], labels)  # written in place (possibly through a view)
        return out
