"""PTQD's step-aware mixed precision (DESIGN.md §3.7): one activation bit-width per denoising step.

Quantization noise hurts little while the sample is still mostly noise and a lot at the end of sampling. At
each step the residual noise that the low-bit model adds to the update, |c_t|·σ_q(t) (c_t the coefficient of
ε̂ in the update, σ_q the PTQD residual after correction), is compared with the noise the sampler's own
next sample carries, √(1 − ᾱ_prev): where it stays below, the step runs at the low bit-width. If the schedule
still costs more bit-operations than the budget, the steps with the smallest noise ratio go low too, in that
order; a budget below the all-low cost is an error.

The schedule is stored in the temporal quantizers themselves: a table row per step with that step's
bit-width (`TemporalQuantizer.row_bits`), filled from the low-bit model's rows and from a high-bit copy
calibrated per timestep (`with_act_bits`). Checkpoints, exports, `integer` mode and every sampler then use
each step's bit-width with no further plumbing. Weight bit-widths stay as they are (one weight copy).

Bit-operations (BOPs) count the multiply-accumulates of every Conv2d/Linear, weighted by weight bits ×
activation bits (32 × 32 for floating-point layers); attention's two activation-activation matmuls are not
counted (they are the same in every schedule).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from .layers import QUANT_LAYERS
from .temporal import TemporalQuantizer

FP_BITS = 32


@dataclass
class StepBits:
    """The per-step activation bit-widths of one sampler schedule, and what they cost."""

    timesteps: list[float]
    bits: list[int]
    noise_ratio: list[float]  # |c_t|·σ_q,low(t) / √(1 − ᾱ_prev) per step
    bops: list[float]  # per step, per sample
    fp_bops: float  # per step, per sample, all layers at 32 × 32 bits

    @property
    def relative_bops(self) -> float:
        """Bit-operations of the whole sampling run relative to the FP model's."""
        return sum(self.bops) / (self.fp_bops * len(self.bops))

    def to_dict(self) -> dict:
        return {"timesteps": self.timesteps, "act_bits": self.bits, "noise_ratio": self.noise_ratio,
                "bops_per_step": self.bops, "fp_bops_per_step": self.fp_bops, "relative_bops": self.relative_bops}


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


def bit_operations(model: nn.Module, macs: dict[str, int], timestep: float) -> float:
    """BOPs per sample of one forward at `timestep`: each layer's MACs × weight bits × its input row's bits."""
    total = 0.0
    for name, n in macs.items():
        m = model.get_submodule(name)
        w_bits = a_bits = FP_BITS
        if isinstance(m, QUANT_LAYERS):
            if len(m.weight_quantizers):
                w_bits = m.weight_quantizers[0].bits
            if len(m.input_quantizers):
                q: TemporalQuantizer = m.input_quantizers[0]
                row = q.rows_for(torch.tensor([float(timestep)], device=q.timesteps.device))
                a_bits = int(q.row_bits[row])
        total += n * w_bits * a_bits
    return total


def choose_step_bits(noise_ratio: Sequence[float], bops_low: Sequence[float], bops_high: Sequence[float],
                     budget: float | None, low: int = 4, high: int = 8) -> list[int]:
    """Per step: `low` where the low-bit noise ratio is ≤ 1, else `high`; then, while the total BOPs exceed
    `budget` (same units as the BOPs given; None: no budget), the high step with the smallest ratio goes low."""
    if not len(noise_ratio) == len(bops_low) == len(bops_high):
        raise ValueError("noise_ratio, bops_low and bops_high must have one entry per step")
    bits = [low if r <= 1.0 else high for r in noise_ratio]
    if budget is None:
        return bits
    if sum(bops_low) > budget * (1 + 1e-9):
        raise ValueError(f"bit-operation budget {budget:.4g} is below the cost of running every step at {low} bits "
                         f"({sum(bops_low):.4g})")
    cost = sum(bl if b == low else bh for b, bl, bh in zip(bits, bops_low, bops_high))
    for i in sorted((i for i, b in enumerate(bits) if b == high), key=lambda i: noise_ratio[i]):
        if cost <= budget:
            break
        bits[i] = low
        cost += bops_low[i] - bops_high[i]
    return bits


def with_act_bits(model: nn.Module, from_bits: int, to_bits: int, batches: Iterable[dict]) -> nn.Module:
    """A copy of `model` whose `from_bits` activation quantizers run at `to_bits`, calibrated per timestep on
    `batches` (FP-chain statistics, as `calibrate_`); weights are the model's own."""
    from .quantize import calibrate_  # quantize imports this module's siblings; keep the import local

    high = copy.deepcopy(model)
    switched = {name for name, q in high.named_modules() if isinstance(q, TemporalQuantizer) and q.bits == from_bits}
    if not switched:
        raise ValueError(f"the model has no {from_bits}-bit activation quantizer to switch to {to_bits} bits")
    for name in switched:
        q = high.get_submodule(name)
        q.bits, q.per_timestep = to_bits, True
    calibrate_(high, batches)
    # calibrate_ re-initialises every table; the quantizers that were not switched keep the model's own
    original = dict(model.named_modules())
    for name, q in high.named_modules():
        if isinstance(q, TemporalQuantizer) and name not in switched:
            q.load_state_dict(original[name].state_dict())
    return high


@torch.no_grad()
def apply_step_bits(low_model: nn.Module, high_model: nn.Module, timesteps: Sequence[float],
                    bits: Sequence[int]) -> nn.Module:
    """Rebuild, in `low_model`, every activation table whose bits differ in `high_model`: one row per
    schedule timestep, taken from the low model's table (low steps) or the high model's (high steps), with
    that row's bit-width. Returns `low_model`."""
    t = torch.tensor([float(x) for x in timesteps])
    high_quantizers = dict(high_model.named_modules())
    for name, q_low in low_model.named_modules():
        if not isinstance(q_low, TemporalQuantizer):
            continue
        q_high = high_quantizers[name]
        if q_high.bits == q_low.bits:
            continue
        use_high = torch.tensor([b == q_high.bits for b in bits])
        if not bool(((torch.tensor(list(bits)) == q_low.bits) | use_high).all()):
            raise ValueError(f"{name}: schedule bits {sorted(set(bits))} are not this quantizer's "
                             f"{q_low.bits} or {q_high.bits}")
        rows_low, rows_high = q_low.rows_for(t), q_high.rows_for(t)
        delta = torch.where(use_high, q_high.delta[rows_high], q_low.delta[rows_low])
        zero = torch.where(use_high, q_high.zero[rows_high], q_low.zero[rows_low])
        q_low._resize(len(t))
        q_low.delta.copy_(delta)
        q_low.zero.copy_(zero)
        q_low.timesteps.copy_(t)
        q_low.per_timestep = True
        q_low.set_row_bits(torch.where(use_high, q_high.bits, q_low.bits))
    return low_model


@torch.no_grad()
def plan_step_bits(low_model: nn.Module, high_model: nn.Module, scheduler, num_steps: int, records: Sequence,
                   budget: float | None = None, eta: float = 0.0) -> StepBits:
    """Choose each step's activation bits for `scheduler` at `num_steps` steps (see the module docstring) and
    apply the schedule to `low_model` in place. `records`: FP trajectory steps of that sampler
    (`record_trajectories(..., keep_steps=None)`), on which the low model's PTQD residual σ_q is measured.
    `budget`: bit-operations of the whole run relative to the FP model's (None: the noise rule alone)."""
    from .corrected_scheduler import NoiseCorrectedScheduler
    from .noise_correction import measure_noise_correction

    residual = measure_noise_correction(low_model, records)
    noise = NoiseCorrectedScheduler(scheduler, residual)
    scheduler.set_timesteps(num_steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    ratio = []
    for t in timesteps:
        step = noise.step_noise(int(t), eta)
        own = (1 - step.alpha_prev) ** 0.5  # the noise the sampler's next sample still carries
        ratio.append(abs(step.c) * residual.residual_std(t) / own if own > 0 else float("inf"))
    first = records[0]
    kwargs = {"sample": first.sample[:1], "timestep": first.timestep[:1]}
    macs = layer_macs(low_model, kwargs)
    fp_bops = float(sum(macs.values()) * FP_BITS * FP_BITS)
    bops_low = [bit_operations(low_model, macs, t) for t in timesteps]
    bops_high = [bit_operations(high_model, macs, t) for t in timesteps]
    high_quantizers = dict(high_model.named_modules())
    pairs = {(q.bits, high_quantizers[n].bits) for n, q in low_model.named_modules()
             if isinstance(q, TemporalQuantizer) and q.bits != high_quantizers[n].bits}
    if len(pairs) != 1:
        raise ValueError(f"the low and high models must differ in one pair of activation bit-widths, got {pairs}")
    ((low, high),) = pairs
    bits = choose_step_bits(ratio, bops_low, bops_high, None if budget is None else budget * fp_bops * len(timesteps),
                            low, high)
    apply_step_bits(low_model, high_model, timesteps, bits)
    return StepBits(timesteps, bits, ratio, [bit_operations(low_model, macs, t) for t in timesteps], fp_bops)
