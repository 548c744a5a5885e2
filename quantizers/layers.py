"""Quantized Conv2d and Linear: a per-output-channel weight quantizer and a temporal input quantizer.

They subclass the float layers, keep the same `weight`/`bias` parameters (so the model's state dict
and `isinstance` checks still work) and only change `forward`.

Input channels may be split into groups that get their own input quantizer and their own weight
quantizer over that slice of the weight (Q-Diffusion's shortcut splitting, docs/design.md §3.2): the layer
then behaves like two layers summed, one per half of `concat(h_deep, h_skip)`.

Weight Dilation (§3.3) stores s per input channel in the `dilation_scale` buffer: the weight holds s·W and
the input is divided by s as the first part of the input quantization step.

A layer may hold a low-rank float branch (`low_rank`, quantizers/low_rank.py: SVDQuant's W = L1·L2 + R); its
`weight` is then the residual R, and the branch runs on the raw input beside the quantized product. Weight
quantizers may be group-wise (`LayerSpec.weight_group_size`: one (Δ, z) per output channel and group of input
channels).

A layer may also hold `step_weights` (quantizers/step_weights.py): a second, higher-bit weight copy that the
sampler steps of a step-aware mixed-precision schedule use; each sample runs on its own step's weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dilation import dilate_weight, dilation_factors
from .low_rank import LowRankBranch, layer_rank
from .step_weights import StepWeights
from .temporal import TemporalQuantizer
from .uniform import UniformQuantizer


@dataclass(frozen=True)
class LayerSpec:
    """Bits for one layer; None keeps that side in floating point."""

    weight_bits: int | None
    act_bits: int | None
    weight_symmetric: bool = False
    act_symmetric: bool = False
    per_timestep: bool = True
    weight_group_size: int = 0  # input channels per weight (Δ, z) group; 0: per output channel
    low_rank: int = 0  # rank of the float branch (at most half the weight's smaller side); 0: none


class QuantLayerMixin:
    """Shared by QuantConv2d and QuantLinear. `channel_dim` is where input channels live in x."""

    channel_dim: int

    def _setup_quant(self, spec: LayerSpec, splits: tuple[int, ...] = ()) -> None:
        self.spec = spec
        in_ch, out_ch = self.weight.shape[1], self.weight.shape[0]
        bounds = [0, *splits, in_ch]
        self.input_groups = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        like = {"device": self.weight.device, "dtype": self.weight.dtype}  # all quantizer state beside the weight
        self.weight_quantizers = nn.ModuleList(
            [UniformQuantizer(spec.weight_bits, spec.weight_symmetric, 0, out_ch, **like,
                              group_size=spec.weight_group_size, group_channels=b - a) for a, b in self.input_groups]
            if spec.weight_bits is not None else []
        )
        rank = layer_rank(spec.low_rank, self.weight, getattr(self, "groups", 1)) if spec.weight_bits is not None else 0
        self.low_rank = LowRankBranch(self.weight, rank) if rank else None
        self.input_quantizers = nn.ModuleList(
            [TemporalQuantizer(spec.act_bits, spec.act_symmetric, spec.per_timestep, **like)
             for _ in self.input_groups]
            if spec.act_bits is not None else []
        )
        if spec.act_bits is not None:
            self.register_buffer("dilation_scale", torch.ones(in_ch, **like))
        self.step_weights: StepWeights | None = None

    @property
    def can_dilate(self) -> bool:
        return len(self.input_quantizers) > 0 and getattr(self, "groups", 1) == 1

    @torch.no_grad()
    def split_low_rank(self) -> None:
        """Move the weight's top singular directions into the low-rank branch (before dilation: the branch
        reads the undilated input), leaving the residual to quantize."""
        if self.low_rank is not None:
            self.low_rank.split_(self.weight)

    @torch.no_grad()
    def apply_weight_dilation(self) -> None:
        """Dilate each input group on its own, so every group's per-channel weight ranges are unchanged."""
        if not self.can_dilate:
            return
        for a, b in self.input_groups:
            w = self.weight[:, a:b]
            s = dilation_factors(w)
            self.weight[:, a:b] = dilate_weight(w, s)
            self.dilation_scale[a:b] *= s.to(self.dilation_scale)

    @torch.no_grad()
    def init_weight_quantizers(self, method: str) -> None:
        for q, (a, b) in zip(self.weight_quantizers, self.input_groups):
            q.init_range(self.weight[:, a:b], method)

    def quant_weight(self) -> torch.Tensor:
        if len(self.weight_quantizers) == 0:
            return self.weight
        parts = [q(self.weight[:, a:b]) for q, (a, b) in zip(self.weight_quantizers, self.input_groups)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.input_quantizers) == 0:
            return x
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        x = x / self.dilation_scale.view(shape)
        if len(self.input_quantizers) == 1:
            return self.input_quantizers[0](x)
        parts = [q(x.narrow(self.channel_dim, a, b - a)) for q, (a, b) in zip(self.input_quantizers, self.input_groups)]
        return torch.cat(parts, dim=self.channel_dim)

    def _forward_with(self, op, x: torch.Tensor) -> torch.Tensor:
        """op(quantized input, quantized weight), plus the low-rank branch on the raw input; with step weights,
        each sample uses its step's weight."""
        y = self._quantized_product(op, x)
        return y if self.low_rank is None else y + self.low_rank(x, self)

    def _quantized_product(self, op, x: torch.Tensor) -> torch.Tensor:
        xq = self.quant_input(x)
        if self.step_weights is None:
            return op(xq, self.quant_weight())
        high = self.step_weights.current(x.shape[0])
        if bool(high.all()):
            return op(xq, self.step_weights.quant_weight())
        if not bool(high.any()):
            return op(xq, self.quant_weight())
        out_high, out_low = op(xq, self.step_weights.quant_weight()), op(xq, self.quant_weight())
        return torch.where(high.view((-1,) + (1,) * (out_low.dim() - 1)), out_high, out_low)

    def extra_repr(self) -> str:
        split = f", split={[b for _, b in self.input_groups[:-1]]}" if len(self.input_groups) > 1 else ""
        group = f", weight groups of {self.spec.weight_group_size}" if self.spec.weight_group_size else ""
        return f"{super().extra_repr()}, W{self.spec.weight_bits}A{self.spec.act_bits}{split}{group}"


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    channel_dim = 1

    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: LayerSpec, splits: tuple[int, ...] = ()) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        q._setup_quant(spec, splits)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_with(lambda xq, w: self._conv_forward(xq, w, self.bias), x)


class QuantLinear(QuantLayerMixin, nn.Linear):
    channel_dim = -1

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: LayerSpec, splits: tuple[int, ...] = ()) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        q._setup_quant(spec, splits)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_with(lambda xq, w: F.linear(xq, w, self.bias), x)


QUANT_LAYERS = (QuantConv2d, QuantLinear)
