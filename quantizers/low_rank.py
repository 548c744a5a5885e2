"""A low-rank floating-point branch beside a quantized layer (SVDQuant): W = L1·L2 + R, only R quantized.

Outliers in a weight matrix are mostly a few large singular directions. Taking the top `rank` of them out into a
float branch, `up · down` (L1 = U·√S, L2 = √S·Vᵀ of the SVD), leaves a residual R with a narrower range per
output channel, and R is what the layer's weight quantizers see. The layer then computes

    y = Q(x / s) ⊛ Q(s·R) + (x ⊛ down) ⊛ up

with the branch on the layer's raw (undilated, unquantized) input, so Weight Dilation, shortcut splitting and the
temporal activation quantizers act on R alone and the branch is exact in float. For a Conv2d the kernel is
flattened: `down` is a conv with `rank` output channels and the layer's own kernel, stride, padding and dilation,
`up` a 1×1 conv to the output channels; with quantization off the layer equals the original to float rounding.

`up` and `down` are parameters: distillation trains them with the weights (the `weights` optimizer group). The
export stores them as float tensors, and `integer` mode adds the branch, in float, to the int8 kernel's output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .uniform import at_least_fp32


def layer_rank(rank: int, weight: torch.Tensor, groups: int = 1) -> int:
    """The branch's rank for a layer of this weight: `rank`, at most half the smaller side of the flattened weight
    (a branch that takes the whole weight would leave nothing to quantize); 0 for grouped convolutions."""
    if rank <= 0 or groups != 1:
        return 0
    return min(rank, min(weight.shape[0], weight[0].numel()) // 2)


def branch_macs(layer_macs: int, weight: torch.Tensor, rank: int) -> int:
    """Multiply-accumulates per sample of a rank-`rank` branch beside a layer of `weight` doing `layer_macs`."""
    positions = layer_macs // max(1, weight.numel())  # output positions
    return positions * rank * (weight[0].numel() + weight.shape[0])


class LowRankBranch(nn.Module):
    """`up · down`, the top singular directions of a Linear [out, in] or Conv2d [out, in, kh, kw] weight."""

    def __init__(self, weight: torch.Tensor, rank: int):
        super().__init__()
        like = {"device": weight.device, "dtype": weight.dtype}
        self.rank = rank
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank, **like))
        self.down = nn.Parameter(torch.zeros(rank, *weight.shape[1:], **like))

    @torch.no_grad()
    def split_(self, weight: torch.Tensor) -> None:
        """Set the branch to the top-`rank` SVD of `weight` and leave the residual R in `weight` (in place)."""
        w = at_least_fp32(weight.detach()).flatten(1)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[: self.rank].sqrt()
        up, down = u[:, : self.rank] * root, root[:, None] * vh[: self.rank]
        self.up.copy_(up)
        self.down.copy_(down.view_as(self.down))
        weight.sub_((up @ down).view_as(weight).to(weight.dtype))

    def product(self) -> torch.Tensor:
        """up · down in the weight's shape (what the branch adds to the layer's weight)."""
        return (self.up @ self.down.flatten(1)).view(self.up.shape[0], *self.down.shape[1:])

    def forward(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """The branch's output for `layer`'s input `x`; a conv uses the layer's own stride, padding, dilation."""
        if self.down.dim() == 2:
            return F.linear(F.linear(x, self.down), self.up)
        h = layer._conv_forward(x, self.down, None)
        return F.conv2d(h, self.up[:, :, None, None])

    def macs(self, layer_macs: int, weight: torch.Tensor) -> int:
        return branch_macs(layer_macs, weight, self.rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
