"""PTQD's step-aware mixed precision (docs/design.md §3.7): a low- or high-precision setting per denoising step.

Quantization noise hurts little while the sample is still mostly noise and a lot at the end of sampling. At
each step the residual noise that the low-precision model adds to the update, |c_t|·σ_q(t) (c_t the coefficient
of ε̂ in the update, σ_q the PTQD residual after correction), is compared with the noise the sampler's own
next sample carries, √(1 − ᾱ_prev): where it stays below, the step runs at low precision. If the schedule
still costs more bit-operations than the budget, the steps with the smallest noise ratio go low too, in that
order; a budget below the all-low cost is an error.

Low precision is the model as trained; high precision is a copy with its low-bit activation quantizers at
higher bits, calibrated per timestep (`with_act_bits`), and optionally its low-bit weights at higher bits
too (`with_weight_bits`: the FP model's weights, dilated like the layer's, quantized afresh). The schedule is
stored in the model itself (`apply_step_bits`): activation tables get a row per step with that step's
bit-width (`TemporalQuantizer.row_bits`), and a layer whose weight bits switch holds the high-bit copy as
`step_weights` with the steps that use it (quantizers/step_weights.py). Checkpoints, exports (two weight
copies), `integer` mode and every sampler then use each step's bits with no further plumbing.

Choosing the schedule needs the model run on FP trajectories: that is qdistill.analysis.step_bits (plan_step_bits);
this module holds the model surgery it applies. Bit-operations are counted as qdistill.cost counts them, with
each layer's bits at the step (`bit_operations`; low-rank branches at 32 × 32).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from ..cost import FP_BITS
from .dilation import dilate_weight
from .layers import QUANT_LAYERS
from .quantize import fit_ranges_
from .step_weights import StepWeights
from .temporal import TemporalQuantizer
from .uniform import UniformQuantizer

@dataclass
class StepBits:
    """The per-step precision of one sampler schedule, and what it costs."""

    timesteps: list[float]
    high: list[bool]  # per step: the high-precision setting
    act_bits: list[int]  # per step: the bits of the switched activation quantizers (the model's own if none)
    weight_bits: list[int]  # per step: the bits of the switched weights (the model's own if none)
    noise_ratio: list[float]  # |c_t|·σ_q,low(t) / √(1 − ᾱ_prev) per step
    bops: list[float]  # per step, per sample
    fp_bops: float  # per step, per sample, all layers at 32 × 32 bits

    @property
    def relative_bops(self) -> float:
        """Bit-operations of the whole sampling run relative to the FP model's."""
        return sum(self.bops) / (self.fp_bops * len(self.bops))

    def to_dict(self) -> dict:
        return {"timesteps": self.timesteps, "high_precision": self.high, "act_bits": self.act_bits,
                "weight_bits": self.weight_bits, "noise_ratio": self.noise_ratio, "bops_per_step": self.bops,
                "fp_bops_per_step": self.fp_bops, "relative_bops": self.relative_bops}


def bit_operations(model: nn.Module, macs: dict[str, int], timestep: float) -> float:
    """BOPs per sample of one forward at `timestep`: each layer's MACs × its weight bits at that step × its
    input row's bits."""
    total = 0.0
    t = torch.tensor([float(timestep)], device=next(model.parameters()).device)
    for name, n in macs.items():
        m = model.get_submodule(name)
        w_bits = a_bits = FP_BITS
        if isinstance(m, QUANT_LAYERS):
            if len(m.weight_quantizers):
                w_bits = m.weight_quantizers[0].bits
            if m.step_weights is not None and bool(m.step_weights.uses(t)[0]):
                w_bits = m.step_weights.bits
            if len(m.input_quantizers):
                q: TemporalQuantizer = m.input_quantizers[0]
                a_bits = int(q.row_bits[q.rows_for(t.to(q.timesteps.device))])
            if m.low_rank is not None:  # the float branch beside the quantized residual
                total += m.low_rank.macs(n, m.weight) * FP_BITS * FP_BITS
        total += n * w_bits * a_bits
    return total


def choose_high_steps(noise_ratio: Sequence[float], bops_low: Sequence[float], bops_high: Sequence[float],
                      budget: float | None) -> list[bool]:
    """Per step: high precision where the low-precision noise ratio exceeds 1; then, while the total BOPs exceed
    `budget` (same units as the BOPs given; None: no budget), the high step with the smallest ratio goes low."""
    if not len(noise_ratio) == len(bops_low) == len(bops_high):
        raise ValueError("noise_ratio, bops_low and bops_high must have one entry per step")
    high = [r > 1.0 for r in noise_ratio]
    if budget is None:
        return high
    if sum(bops_low) > budget * (1 + 1e-9):
        raise ValueError(f"bit-operation budget {budget:.4g} is below the cost of running every step at low "
                         f"precision ({sum(bops_low):.4g})")
    cost = sum(bh if h else bl for h, bl, bh in zip(high, bops_low, bops_high))
    for i in sorted((i for i, h in enumerate(high) if h), key=lambda i: noise_ratio[i]):
        if cost <= budget:
            break
        high[i] = False
        cost += bops_low[i] - bops_high[i]
    return high


def with_act_bits(model: nn.Module, from_bits: int, to_bits: int, batches: Iterable[dict]) -> nn.Module:
    """A copy of `model` whose `from_bits` activation quantizers run at `to_bits`, calibrated per timestep on
    `batches` (FP-chain statistics, as `fit_ranges_`); weights are the model's own."""
    high = copy.deepcopy(model)
    switched = {name for name, q in high.named_modules() if isinstance(q, TemporalQuantizer) and q.bits == from_bits}
    if not switched:
        raise ValueError(f"the model has no {from_bits}-bit activation quantizer to switch to {to_bits} bits")
    for name in switched:
        q = high.get_submodule(name)
        q.bits, q.per_timestep = to_bits, True
    fit_ranges_(high, batches)
    # fit_ranges_ re-initialises every table; the quantizers that were not switched keep the model's own
    original = dict(model.named_modules())
    for name, q in high.named_modules():
        if isinstance(q, TemporalQuantizer) and name not in switched:
            q.load_state_dict(original[name].state_dict())
    if high.qdistill_config.act_bits == from_bits:
        high.qdistill_config = dataclasses.replace(high.qdistill_config, act_bits=to_bits)
    return high


@torch.no_grad()
def with_weight_bits(model: nn.Module, from_bits: int, to_bits: int, fp_model: nn.Module | None = None,
                     method: str | None = None) -> nn.Module:
    """A copy of `model` whose `from_bits` weights are quantized afresh at `to_bits` (per output channel, range
    by `method`, default the config's `weight_init`). The weights quantized are `fp_model`'s, dilated by each
    layer's `dilation_scale` as the layer's own were (the trained low-bit weights may sit on their 4-bit grid,
    e.g. after AdaRound), or the model's own when `fp_model` is None. Biases stay the model's."""
    high = copy.deepcopy(model)
    method = method or high.qdistill_config.weight_init
    layers = [(n, m) for n, m in high.named_modules()
              if isinstance(m, QUANT_LAYERS) and len(m.weight_quantizers) and m.weight_quantizers[0].bits == from_bits]
    if not layers:
        raise ValueError(f"the model has no {from_bits}-bit weights to switch to {to_bits} bits")
    for name, m in layers:
        if fp_model is not None:
            try:
                w = fp_model.get_submodule(name).weight.detach().to(m.weight)
            except AttributeError:
                raise ValueError(f"the FP model has no layer {name} to take {to_bits}-bit weights from") from None
            if w.shape != m.weight.shape:
                raise ValueError(f"the FP model's {name}.weight is {tuple(w.shape)}, the quantized layer's "
                                 f"{tuple(m.weight.shape)}")
            if m.low_rank is not None:  # the copy stands in for the residual: the branch is shared by both
                w = w - m.low_rank.product().detach()
            if hasattr(m, "dilation_scale"):
                w = torch.cat([dilate_weight(w[:, a:b], m.dilation_scale[a:b]) for a, b in m.input_groups], dim=1)
            m.weight.copy_(w)
        m.weight_quantizers = nn.ModuleList([UniformQuantizer(to_bits, q.symmetric, 0, m.weight.shape[0]).to(m.weight)
                                             for q in m.weight_quantizers])
        m.init_weight_quantizers(method)
        m.spec = dataclasses.replace(m.spec, weight_bits=to_bits)
    if high.qdistill_config.weight_bits == from_bits:
        high.qdistill_config = dataclasses.replace(high.qdistill_config, weight_bits=to_bits)
    return high


@torch.no_grad()
def apply_step_bits(low_model: nn.Module, high_model: nn.Module, timesteps: Sequence[float],
                    high: Sequence[bool]) -> nn.Module:
    """Install, in `low_model`, the schedule that runs the steps flagged in `high` as `high_model` does and the
    others as itself: every activation table whose bits differ gets one row per schedule timestep, taken from
    the low or the high model's table with that row's bit-width; every layer whose weight bits differ gets the
    high model's weight and quantizers as `step_weights`, used on the high steps. Returns `low_model`."""
    if len(timesteps) != len(high):
        raise ValueError(f"the schedule has {len(timesteps)} timesteps and {len(high)} precision flags")
    device = next(low_model.parameters()).device
    t = torch.tensor([float(x) for x in timesteps], device=device)
    use_high = torch.tensor([bool(h) for h in high], device=device)
    high_modules = dict(high_model.named_modules())
    for name, m_low in list(low_model.named_modules()):  # step weights get added as we go
        m_high = high_modules[name]
        if isinstance(m_low, TemporalQuantizer) and m_high.bits != m_low.bits:
            rows_low, rows_high = m_low.rows_for(t), m_high.rows_for(t)
            delta = torch.where(use_high, m_high.delta[rows_high], m_low.delta[rows_low])
            zero = torch.where(use_high, m_high.zero[rows_high], m_low.zero[rows_low])
            m_low._resize(len(t))
            m_low.delta.copy_(delta)
            m_low.zero.copy_(zero)
            m_low.timesteps.copy_(t)
            m_low.per_timestep = True
            m_low.set_row_bits(torch.where(use_high, m_high.bits, m_low.bits))
        elif (isinstance(m_low, QUANT_LAYERS) and len(m_low.weight_quantizers)
              and m_high.weight_quantizers[0].bits != m_low.weight_quantizers[0].bits):
            q = m_high.weight_quantizers[0]
            copy_ = StepWeights(m_high.weight.to(m_low.weight), m_low.input_groups, q.bits, q.symmetric)
            copy_.weight_quantizers.load_state_dict(m_high.weight_quantizers.state_dict())
            copy_.set_schedule(t, use_high)
            m_low.step_weights = copy_
    return low_model


def switched_bits(low_model: nn.Module, high_model: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """((low, high) weight bits, (low, high) activation bits) of the quantizers that differ; a side that does
    not switch reports the low model's config bits twice."""
    cfg = low_model.qdistill_config
    high_modules = dict(high_model.named_modules())
    w, a = set(), set()
    for name, m in low_model.named_modules():
        h = high_modules[name]
        if isinstance(m, TemporalQuantizer) and m.bits != h.bits:
            a.add((m.bits, h.bits))
        elif isinstance(m, QUANT_LAYERS) and len(m.weight_quantizers) and m.weight_quantizers[0].bits != h.weight_quantizers[0].bits:
            w.add((m.weight_quantizers[0].bits, h.weight_quantizers[0].bits))
    if len(w) > 1 or len(a) > 1 or not (w or a):
        raise ValueError(f"the low and high models must differ in one pair of weight and/or activation bit-widths, "
                         f"got weights {sorted(w)}, activations {sorted(a)}")
    return (w.pop() if w else (cfg.weight_bits,) * 2), (a.pop() if a else (cfg.act_bits,) * 2)
