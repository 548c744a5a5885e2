"""Sampler trajectories of a diffusers UNet: the inputs (x_t, t, conditioning) the model sees at every
step, and its noise predictions. Calibration data for quantization (Q-Diffusion §3.1): data-free.

The loop is diffusers' own: `scheduler.set_timesteps`, `scale_model_input`, `unet(...)`, `scheduler.step`.
Each sample's starting noise comes from its own seed, so a sample is the same whichever batch or rank
draws it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def sample_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return unet.config.in_channels, h, w


@torch.no_grad()
def run_sampler(unet, scheduler, noise: torch.Tensor, num_steps: int, eta: float = 0.0,
                on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoise `noise` in `num_steps` steps; `on_step(i, t, model_input, noise_pred)` sees every UNet call."""
    scheduler.set_timesteps(num_steps)
    step_params = inspect.signature(scheduler.step).parameters
    extra = {}
    if "eta" in step_params:
        extra["eta"] = eta
    if "generator" in step_params:
        extra["generator"] = generator
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        eps = unet(model_input, t).sample
        if on_step is not None:
            on_step(i, t, model_input, eps)
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


@dataclass
class StepRecord:
    """One UNet call on the trajectory: the batch of inputs at one step and the FP noise prediction."""

    step: int
    timestep: torch.Tensor  # [B]
    sample: torch.Tensor  # [B, C, H, W], the UNet's input
    noise_pred: torch.Tensor  # [B, C, H, W]


def record_trajectories(unet, scheduler, seeds: Sequence[int], num_steps: int, batch_size: int = 16,
                        eta: float = 0.0, keep_steps: Sequence[int] | None = None) -> tuple[torch.Tensor, list[StepRecord]]:
    """Run the sampler on `seeds`; return the final samples and the records of the steps in `keep_steps`
    (all steps when None)."""
    keep = None if keep_steps is None else set(keep_steps)
    finals, records = [], []
    shape = sample_shape(unet)
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]

        def on_step(i, t, model_input, eps):
            if keep is None or i in keep:
                records.append(StepRecord(i, torch.full((len(chunk),), float(t)), model_input.clone(), eps.clone()))

        finals.append(run_sampler(unet, scheduler, seeded_noise(chunk, shape), num_steps, eta, on_step))
    return torch.cat(finals), records


def uniform_steps(num_steps: int, every: int) -> list[int]:
    """Q-Diffusion's uniform interval: every `every`-th step, starting from the first."""
    if every < 1:
        raise ValueError(f"step interval must be >= 1, got {every}")
    return list(range(0, num_steps, every))
