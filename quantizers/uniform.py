"""Uniform affine fake quantization with learnable step size (LSQ) and zero point.

    q = clamp(round(x / Δ) + z, qmin, qmax),   x̂ = (q − z) · Δ

Rounding uses a straight-through estimator, so gradients reach x (inside the clipping range), Δ and z.
The range search helpers here are shared by the weight quantizer (one row per output channel) and the
temporal activation quantizer (one row per timestep).
"""
from __future__ import annotations

import torch
from torch import nn

MIN_BITS, MAX_BITS = 2, 8
SEARCH_CHUNK_ELEMENTS = 1 << 18  # elements of x times candidates searched in one pass (1 MiB in fp32: stays in cache)


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid: signed for symmetric quantizers, unsigned for asymmetric ones."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` for range statistics and searches: float64 stays float64, anything narrower becomes fp32."""
    return x if x.dtype == torch.float64 else x.float()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def fake_quant(x: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize; `delta` and `zero` broadcast against `x`."""
    delta = delta.abs().clamp_min(1e-10)  # a step size trained through zero must not flip the grid
    if torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad or zero.requires_grad):
        z = round_ste(zero)
        q = torch.clamp(round_ste(x / delta) + z, qmin, qmax)
        return (q - z) * delta
    # Inference: the same values (round_ste's forward is exact for |x/Δ| < 2^23), in place, fewer passes.
    z = zero.round()
    return torch.round(x / delta).add_(z).clamp_(qmin, qmax).sub_(z).mul_(delta)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point whose grid covers [lo, hi] (widened to include 0, so 0 is exact)."""
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if symmetric:
        delta = torch.maximum(-lo, hi) / qmax
        zero = torch.zeros_like(delta)
    else:
        delta = (hi - lo) / (qmax - qmin)
        zero = qmin - torch.round(lo / delta.clamp_min(1e-10))
    return delta.clamp_min(1e-8), zero


@torch.no_grad()
def search_range(
    x: torch.Tensor, bits: int, symmetric: bool, method: str = "mse", num_candidates: int = 80, lo=None, hi=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (delta, zero) for `x` of shape [rows, n].

    `minmax` covers each row's full range. `mse` shrinks the range by a factor α ∈ (0, 1] and keeps, per row,
    the α with the lowest quantization MSE; α = 1 (min/max) is always a candidate, so MSE is never worse.
    `lo`/`hi` override the row extremes (used when `x` is a subsample of a larger tensor).
    """
    x = at_least_fp32(x)
    lo = x.amin(dim=1) if lo is None else lo.to(x)
    hi = x.amax(dim=1) if hi is None else hi.to(x)
    if method not in ("minmax", "mse"):
        raise ValueError(f"range init method must be 'minmax' or 'mse', got {method!r}")
    if method == "minmax" or x.device.type == "meta":  # meta tensors hold no values: nothing to search
        return params_from_range(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    best_err = torch.full_like(lo, float("inf"))
    best_delta, best_zero = params_from_range(lo, hi, bits, symmetric)
    alphas = torch.linspace(1.0, 0.1, num_candidates).to(device=x.device, dtype=x.dtype)
    # Candidates side by side, as many at a time as SEARCH_CHUNK_ELEMENTS allows: the same arithmetic as one
    # candidate at a time (one pass per candidate costs more in calls than in work for all but the largest layers)
    step = max(1, SEARCH_CHUNK_ELEMENTS // max(1, x.numel()))
    for first in range(0, num_candidates, step):
        a = alphas[first:first + step, None]
        delta, zero = params_from_range(lo * a, hi * a, bits, symmetric)  # [k, rows]
        err = (fake_quant(x, delta[..., None], zero[..., None], qmin, qmax) - x).pow(2).mean(dim=-1)
        pick = err.argmin(dim=0)  # the first of equal errors (the wider range), as one at a time keeps it
        err = err.gather(0, pick[None])[0]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_delta = torch.where(better, delta.gather(0, pick[None])[0], best_delta)
        best_zero = torch.where(better, zero.gather(0, pick[None])[0], best_zero)
    return best_delta, best_zero


class UniformQuantizer(nn.Module):
    """Fake quantizer for one tensor, per tensor or per channel along `channel_axis`.

    Used for weights (per output channel, axis 0). Δ is a learnable parameter (LSQ); for asymmetric
    quantizers so is z. `enabled = False` passes the input through unchanged. `device`/`dtype` are the
    quantized tensor's (as for torch.nn layers): the state is created there, never on the CPU by default.

    `group_size` > 0 (weights, axis 0 only) gives each output channel one (Δ, z) per group of `group_size` input
    channels (dim 1 of a weight with `group_channels` of them; a conv's group spans its whole kernel window; the
    last group may be smaller). The rows are then `num_channels × groups`, output channel major.
    """

    def __init__(self, bits: int, symmetric: bool = False, channel_axis: int | None = 0, num_channels: int = 1,
                 device=None, dtype=None, group_size: int = 0, group_channels: int = 0):
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = symmetric
        self.channel_axis = channel_axis
        if group_size and (channel_axis != 0 or group_channels < 1):
            raise ValueError("group-wise quantization needs a weight quantizer (channel_axis 0) and its input "
                             "channel count")
        self.group_size = group_size if group_size and group_size < group_channels else 0
        self.group_channels = group_channels
        rows = num_channels if channel_axis is not None else 1
        rows *= self.num_groups
        self.delta = nn.Parameter(torch.ones(rows, device=device, dtype=dtype))
        if symmetric:
            self.register_buffer("zero", torch.zeros(rows, device=device, dtype=dtype))
        else:
            self.zero = nn.Parameter(torch.zeros(rows, device=device, dtype=dtype))
        self.enabled = True

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]

    @property
    def num_groups(self) -> int:
        """Groups of input channels per output channel (1 unless group-wise)."""
        return -(-self.group_channels // self.group_size) if self.group_size else 1

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is None:
            return x.reshape(1, -1)
        if self.group_size:  # zero-padded to whole groups: 0 is on every grid, so padding changes no range or pick
            pad = self.num_groups * self.group_size - x.shape[1]
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1) if pad else x
            return x.reshape(x.shape[0] * self.num_groups, -1)
        return x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)

    def _broadcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is None:
            return p.reshape(())
        if self.group_size:  # each input channel reads its group's row
            p = p.reshape(x.shape[0], self.num_groups).repeat_interleave(self.group_size, dim=1)[:, : x.shape[1]]
            return p.reshape(*p.shape, *([1] * (x.dim() - 2)))
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return p.reshape(shape)

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, method: str = "minmax") -> None:
        delta, zero = search_range(self._rows(x), self.bits, self.symmetric, method)
        self.delta.copy_(delta)
        self.zero.copy_(zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return fake_quant(x, self._broadcast(self.delta, x), self._broadcast(self.zero, x), self.qmin, self.qmax)

    @torch.no_grad()
    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes q of `x` (what an export packs)."""
        delta = self._broadcast(self.delta.abs().clamp_min(1e-10), x)
        zero = self._broadcast(self.zero.round(), x)
        return torch.clamp(torch.round(x / delta) + zero, self.qmin, self.qmax).to(torch.int16)

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        if self.group_size:
            kind += f", groups of {self.group_size} input channels"
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {kind}"
