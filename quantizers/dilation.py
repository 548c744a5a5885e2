"""Weight Dilation (DilateQuant; docs/design.md §3.3).

The SmoothQuant identity Y = (X / s)(s · W) with a per-input-channel s ≥ 1 computed from the weights
alone. Weights are quantized per output channel, so dilating an input channel that supplies no output
channel's extreme leaves every output channel's [min, max] — hence Δ_w and z_w — unchanged, while the
activation range shrinks by s.
"""
from __future__ import annotations

import torch

from .uniform import at_least_fp32


@torch.no_grad()
def dilation_factors(weight: torch.Tensor) -> torch.Tensor:
    """Per-input-channel s for a Linear [out, in] or Conv [out, in, kh, kw] weight.

    s_k = 1 for saturated channels (those holding some output channel's max or min); otherwise the
    largest s keeping s·W_jk inside [Wmin_j, Wmax_j] for every output channel j (and kernel position).
    """
    w = at_least_fp32(weight.detach())
    w = w.flatten(2) if w.dim() > 2 else w[:, :, None]
    wmax = w.amax(dim=(1, 2), keepdim=True)
    wmin = w.amin(dim=(1, 2), keepdim=True)
    inf = torch.full((), float("inf"), dtype=w.dtype, device=w.device)
    up = torch.where(w > 0, wmax / w, inf)  # positive weights may grow up to their row's max
    down = torch.where(w < 0, wmin / w, inf)  # negative ones down to their row's min; zeros impose nothing
    s = torch.minimum(up, down).amin(dim=(0, 2))
    saturated = ((w == wmax) | (w == wmin)).any(dim=2).any(dim=0)
    s = torch.where(saturated | torch.isinf(s), torch.ones_like(s), s)
    return s.clamp_min(1.0)


@torch.no_grad()
def dilate_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """s·W along input channels, clamped to each output channel's original range.

    The clamp only removes the last-ulp overshoot of s·W_jk ≈ Wmax_j, so ranges stay exactly equal.
    """
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    dims = tuple(range(1, weight.dim()))
    wmax = weight.amax(dim=dims, keepdim=True)
    wmin = weight.amin(dim=dims, keepdim=True)
    return torch.minimum(torch.maximum(weight * s.view(shape).to(weight.dtype), wmin), wmax)
