"""AdaRound: learned rounding of weights (Nagel et al. 2020), as Q-Diffusion uses it (docs/design.md §3.6).

Every weight chooses to round down or up on the grid of its layer's existing weight quantizer (Δ, z per
output channel, fixed):

    W̃ = Δ · (clamp(floor(W/Δ) + h(α) + z, qmin, qmax) − z),    h(α) = clip(σ(α)(ζ − γ) + γ, 0, 1)

with γ = −0.1, ζ = 1.1 (the stretch lets h reach exactly 0 and 1 with finite α). α starts where h equals the
fractional part of W/Δ, so W̃ = W at the start (inside the grid). The regulariser Σ(1 − |2h − 1|^β) pushes
every h to 0 or 1 while β is annealed from large (only nearly decided values feel it) to small. At the
end the decision is hard (α ≥ 0: round up) and `harden` writes the grid values (q − z)·Δ back into the
layer's weight and puts the layer's own weight quantizer back: that quantizer then reproduces exactly
those codes, so checkpoints, export and integer kernels see an ordinary quantized layer.

Pure math: no I/O, no training loop.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import QUANT_LAYERS
from .uniform import UniformQuantizer

GAMMA, ZETA = -0.1, 1.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """h(α) = clip(σ(α)(ζ − γ) + γ, 0, 1): the soft rounding decision, in [0, 1]."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def alpha_for(h: torch.Tensor) -> torch.Tensor:
    """The α whose h(α) is `h` (for h in [0, 1)): the inverse of the rectified sigmoid's unclipped part."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h − 1|^β): zero when every h is 0 or 1; β sets how far from a decision it still pulls."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """β of the regulariser at iteration `step` (1-based) of `total`; None during the warm-up, where the
    regulariser is off. After the warm-up β falls linearly in the relative iteration, from `start` when
    the warm-up ends to `end` at the last iteration (Q-Diffusion's / BRECQ's schedule)."""
    warm = warmup * total
    if step < warm:
        return None
    progress = (step - warm) / (total - warm) if total > warm else 1.0
    return end + (start - end) * max(0.0, 1.0 - progress)


class AdaRoundQuantizer(UniformQuantizer):
    """A weight quantizer whose rounding is learned: it stands in for one of a layer's UniformQuantizers (one
    input group) while AdaRound trains, with the same grid, call and `to_int`, so the layer runs unchanged.

    It shares Δ and z with the quantizer it replaces (the same tensors, under the same state-dict names), adds
    α (one per weight of its input group) and keeps the replaced quantizer to put back (`restore`).
    `hard = True` uses the final decision α ≥ 0 instead of h(α).
    """

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor):
        nn.Module.__init__(self)  # not UniformQuantizer's: Δ and z are the replaced quantizer's, not new ones
        self.bits, self.symmetric, self.channel_axis = quantizer.bits, quantizer.symmetric, quantizer.channel_axis
        self.group_size, self.group_channels = quantizer.group_size, quantizer.group_channels
        self.delta = quantizer.delta
        if isinstance(quantizer.zero, nn.Parameter):
            self.zero = quantizer.zero
        else:
            self.register_buffer("zero", quantizer.zero)
        self.enabled = True
        self.hard = False
        self._replaced = [quantizer]  # a list: not a submodule, so the state dict keeps the old names
        with torch.no_grad():
            scaled = weight.detach().float() / self._step(weight)
            fraction = scaled - torch.floor(scaled)  # in [0, 1] (1 only by float rounding)
            self.alpha = nn.Parameter(alpha_for(fraction).to(weight.dtype))

    def _step(self, w: torch.Tensor) -> torch.Tensor:
        return self._broadcast(self.delta.detach().abs().clamp_min(1e-10), w)  # as fake_quant reads Δ

    def soft_targets(self) -> torch.Tensor:
        return rectified_sigmoid(self.alpha)

    def decisions(self) -> torch.Tensor:
        """The rounding chosen for every weight: 1 up, 0 down (what `hard` and `harden` use)."""
        return (self.alpha.detach() >= 0).to(self.alpha.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        delta = self._step(w)
        zero = self._broadcast(self.zero.detach().round(), w)
        up = self.decisions() if self.hard else self.soft_targets()
        q = torch.clamp(torch.floor(w.detach() / delta) + up + zero, self.qmin, self.qmax)
        return (q - zero) * delta

    @torch.no_grad()
    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes of the hard decision."""
        delta = self._step(w)
        zero = self._broadcast(self.zero.round(), w)
        q = torch.clamp(torch.floor(w / delta) + self.decisions() + zero, self.qmin, self.qmax)
        return q.to(torch.int16)

    @torch.no_grad()
    def grid_weight(self, w: torch.Tensor) -> torch.Tensor:
        """(q − z)·Δ for the hard codes q: values the replaced quantizer maps to exactly themselves."""
        zero = self._broadcast(self.zero.round(), w)
        return ((self.to_int(w).to(w.dtype) - zero) * self._step(w)).to(w.dtype)

    def restore(self) -> UniformQuantizer:
        return self._replaced[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adaround({'hard' if self.hard else 'soft'})"


def adaround_quantizers(module: nn.Module) -> list[AdaRoundQuantizer]:
    return [m for m in module.modules() if isinstance(m, AdaRoundQuantizer)]


def attach_adaround(module: nn.Module) -> list[AdaRoundQuantizer]:
    """Replace the weight quantizer of every input group (shortcut splits included) of every quantized layer
    inside `module` by an AdaRoundQuantizer initialised from that group's weights; return them."""
    attached = []
    for layer in module.modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        for g, (q, (a, b)) in enumerate(list(zip(layer.weight_quantizers, layer.input_groups))):
            if isinstance(q, AdaRoundQuantizer):
                raise ValueError(f"{type(layer).__name__} already has AdaRound quantizers attached")
            layer.weight_quantizers[g] = AdaRoundQuantizer(q, layer.weight[:, a:b])
            attached.append(layer.weight_quantizers[g])
    return attached


@torch.no_grad()
def harden(module: nn.Module) -> int:
    """Write every AdaRound decision inside `module` into its layer's weight as grid values (q − z)·Δ and put
    the layer's own weight quantizer back. Returns the number of input groups hardened."""
    count = 0
    for layer in module.modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        for g, (q, (a, b)) in enumerate(list(zip(layer.weight_quantizers, layer.input_groups))):
            if isinstance(q, AdaRoundQuantizer):
                layer.weight[:, a:b] = q.grid_weight(layer.weight[:, a:b])
                layer.weight_quantizers[g] = q.restore()
                count += 1
    return count


def hard_fraction(quantizers: list[AdaRoundQuantizer], tol: float = 1e-3) -> float:
    """Share of soft decisions within `tol` of 0 or 1 (how settled the rounding is)."""
    with torch.no_grad():
        hs = [q.soft_targets().flatten() for q in quantizers]
        if not hs:
            return math.nan
        h = torch.cat(hs)
        return ((h <= tol) | (h >= 1 - tol)).float().mean().item()
