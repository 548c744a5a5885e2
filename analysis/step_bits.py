"""PTQD's step-aware mixed precision, planned: each sampler step's precision chosen from the low-precision
model's measured noise (quantizers/mixed_precision.py's module docstring gives the rule) and applied to it."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..cost import FP_BITS, layer_macs
from ..denoisers import model_kwargs
from ..quantizers.corrected_scheduler import NoiseCorrectedScheduler
from ..quantizers.mixed_precision import StepBits, switched_bits, apply_step_bits, bit_operations, choose_high_steps
from .noise_statistics import measure_noise_correction


@torch.no_grad()
def plan_step_bits(low_model: nn.Module, high_model: nn.Module, scheduler, num_steps: int, records: Sequence,
                   budget: float | None = None, eta: float = 0.0) -> StepBits:
    """Choose each step's precision for `scheduler` at `num_steps` steps (see the module docstring) and apply
    the schedule to `low_model` in place. `records`: FP trajectory steps of that sampler
    (`record_trajectories(..., keep_steps=None)`), on which the low model's PTQD residual σ_q is measured.
    `budget`: bit-operations of the whole run relative to the FP model's (None: the noise rule alone)."""
    w_pair, a_pair = switched_bits(low_model, high_model)
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
    macs = layer_macs(low_model, model_kwargs(low_model, first.sample[:1], first.timestep[:1]))
    fp_bops = float(sum(macs.values()) * FP_BITS * FP_BITS)
    bops_low = [bit_operations(low_model, macs, t) for t in timesteps]
    bops_high = [bit_operations(high_model, macs, t) for t in timesteps]
    high = choose_high_steps(ratio, bops_low, bops_high,
                             None if budget is None else budget * fp_bops * len(timesteps))
    apply_step_bits(low_model, high_model, timesteps, high)
    return StepBits(timesteps, high, [a_pair[h] for h in high], [w_pair[h] for h in high], ratio,
                    [bit_operations(low_model, macs, t) for t in timesteps], fp_bops)
