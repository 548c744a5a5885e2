"""Cost accounting: multiply-accumulates (MACs) and bit-operations (BOPs) of a model's Conv2d/Linear layers.

BOPs count each layer's MACs × weight bits × activation bits, with floating-point layers at 32 × 32. Attention's
two activation-activation matmuls are not counted (they are the same under every layer precision). The bits of
a quantized model at a given timestep are read by quantizers/mixed_precision.bit_operations; layer precision
rules and the sensitivity-driven layer choice count with `rule_bit_operations`.
"""
from __future__ import annotations

import torch
from torch import nn

FP_BITS = 32


@torch.no_grad()
def layer_macs(model: nn.Module, model_kwargs: dict) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv2d/Linear in one forward with `model_kwargs`."""
    macs: dict[str, int] = {}

    def hook(name):
        def count(module, args, output):
            per_out = module.weight[0].numel()  # in/groups · kh · kw, or in_features
            macs[name] = macs.get(name, 0) + output.numel() // output.shape[0] * per_out
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model(**model_kwargs)
    finally:
        for h in handles:
            h.remove()
    return macs


def bits_cost(bits: tuple[int, int] | None) -> int:
    """Weight bits × activation bits of one layer; None (floating point) is 32 × 32."""
    return FP_BITS * FP_BITS if bits is None else bits[0] * bits[1]


def rule_bit_operations(macs: dict[str, int], bits: dict[str, tuple[int, int] | None]) -> float:
    """BOPs per sample: each layer's MACs × its (weight bits, activation bits) in `bits` (absent or None: FP)."""
    return float(sum(n * bits_cost(bits.get(name)) for name, n in macs.items()))
