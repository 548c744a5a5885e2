"""A diffusers scheduler that samples a quantized UNet with PTQD's noise correction (docs/design.md §3.7).

`NoiseCorrectedScheduler(scheduler, correction)` wraps a real `DDIMScheduler` (any η) or `DDPMScheduler`
(variance_type fixed_small). Its `step`:

1. corrects the prediction with the row of t: ε̂ = (ε_q − b_t)/(1 + k_t);
2. calls the wrapped scheduler's own `step` on ε̂ (the update is diffusers', never re-implemented);
3. calibrates the variance schedule: the residual quantization noise, c_t·σ_q(t) with c_t the coefficient of
   ε̂ in the update, already adds variance, so the injected noise σ_t·z shrinks to
   σ_t' = sqrt(max(σ_t² − c_t²σ_q², 0)), with z drawn exactly as diffusers draws it (same generator, shape,
   device, dtype), so with zero statistics the result equals the plain scheduler's bit for bit.

Everything else (set_timesteps, timesteps, init_noise_sigma, scale_model_input, config, ...) is the
wrapped scheduler's, so the wrapper drops into `run_sampler` and into diffusers pipelines (`pipe.scheduler`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .noise_correction import NoiseCorrection

_OWN_ATTRIBUTES = ("scheduler", "correction")


@dataclass(frozen=True)
class StepNoise:
    """At one timestep: c (coefficient of ε̂ in the update, without clipping), sigma (the std of the noise
    the scheduler injects), sigma_corrected (σ_t' after the variance-schedule calibration), alpha_prev (ᾱ of
    the step's target, so √(1 − ᾱ_prev) is the noise level the next sample carries)."""

    c: float
    sigma: float
    sigma_corrected: float
    alpha_prev: float

    @property
    def noise_scale(self) -> float:
        """σ_t'/σ_t: exactly 1.0 when there is nothing to shrink."""
        return self.sigma_corrected / self.sigma if self.sigma > 0 else 1.0


class NoiseCorrectedScheduler:
    """Wraps a diffusers DDIM or DDPM scheduler; see the module docstring."""

    def __init__(self, scheduler, correction: NoiseCorrection):
        if isinstance(scheduler, NoiseCorrectedScheduler):
            raise TypeError("the scheduler is already noise-corrected; wrap the plain diffusers scheduler")
        if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
            raise TypeError(f"PTQD noise correction supports DDIMScheduler and DDPMScheduler, not "
                            f"{type(scheduler).__name__}")
        prediction = scheduler.config.prediction_type
        if prediction != "epsilon":
            raise ValueError(f"PTQD corrects noise predictions: the scheduler's prediction_type must be 'epsilon', "
                             f"got {prediction!r}")
        if isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type != "fixed_small":
            raise ValueError(f"PTQD noise correction supports DDPMScheduler with variance_type 'fixed_small' only, "
                             f"got {scheduler.config.variance_type!r}")
        if not isinstance(correction, NoiseCorrection):
            raise TypeError(f"correction must be a NoiseCorrection, got {type(correction).__name__}")
        object.__setattr__(self, "scheduler", scheduler)
        object.__setattr__(self, "correction", correction)

    # -- delegation: the wrapped scheduler stays as diffusers made it -----------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in _OWN_ATTRIBUTES:  # not set yet (e.g. during unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            setattr(self.scheduler, name, value)

    def __len__(self) -> int:
        return len(self.scheduler)

    def __repr__(self) -> str:
        return (f"NoiseCorrectedScheduler({type(self.scheduler).__name__}, "
                f"{self.correction.timesteps.numel()} corrected steps)")

    # -- the step's noise --------------------------------------------------------------------------------
    def step_noise(self, timestep: int | torch.Tensor, eta: float = 0.0) -> StepNoise:
        """c_t, σ_t and σ_t' at `timestep`, from the wrapped scheduler's alphas_cumprod and previous timestep
        (after set_timesteps)."""
        s = self.scheduler
        if s.num_inference_steps is None:
            raise ValueError("call set_timesteps on the scheduler before stepping it")
        t = int(timestep)
        alpha_t = float(s.alphas_cumprod[t])
        if isinstance(s, DDIMScheduler):
            # DDIMScheduler.step's own previous timestep and variance (it has no previous_timestep method)
            prev = t - s.config.num_train_timesteps // s.num_inference_steps
            alpha_prev = float(s.alphas_cumprod[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
            sigma = float(eta * s._get_variance(t, prev) ** 0.5)
            # x_prev = √ᾱ_prev·(x − √(1−ᾱ_t)·ε)/√ᾱ_t + √(1 − ᾱ_prev − σ²)·ε + σz
            c = math.sqrt(max(1 - alpha_prev - sigma**2, 0.0)) - math.sqrt(alpha_prev * (1 - alpha_t) / alpha_t)
        else:
            prev = int(s.previous_timestep(t))
            alpha_prev = float(s.alphas_cumprod[prev]) if prev >= 0 else float(s.one)
            sigma = float(s._get_variance(t) ** 0.5) if t > 0 else 0.0  # diffusers adds no noise at t = 0
            # x_prev = √ᾱ_prev·β_t/(1−ᾱ_t)·x̂0 + ...,  x̂0 = (x − √(1−ᾱ_t)·ε)/√ᾱ_t
            beta_t = 1 - alpha_t / alpha_prev
            c = -math.sqrt(alpha_prev) * beta_t / (1 - alpha_t) * math.sqrt((1 - alpha_t) / alpha_t)
        sigma_q = self.correction.residual_std(t)
        if sigma_q == 0 or sigma == 0:
            return StepNoise(c, sigma, sigma, alpha_prev)
        return StepNoise(c, sigma, math.sqrt(max(sigma**2 - (c * sigma_q) ** 2, 0.0)), alpha_prev)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | list[torch.Generator] | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True, **kwargs):
        """The wrapped scheduler's step on the corrected prediction, with the injected noise shrunk to σ_t'.
        `eta` and `variance_noise` apply to DDIM (DDPM has neither: they are ignored / refused)."""
        eps = self.correction.correct(model_output, timestep)
        if isinstance(self.scheduler, DDIMScheduler):
            out = self._ddim_step(eps, timestep, sample, eta, generator, variance_noise, kwargs)
        else:
            if variance_noise is not None:
                raise ValueError("DDPMScheduler.step takes no variance_noise; pass a generator")
            out = self._ddpm_step(eps, timestep, sample, generator, kwargs)
        return out if return_dict else (out.prev_sample, out.pred_original_sample)

    def _ddim_step(self, eps, timestep, sample, eta, generator, variance_noise, kwargs):
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either a generator or variance_noise to the DDIM step, not both")
            if variance_noise is None:  # diffusers' own draw, so the RNG advances as it would
                variance_noise = randn_tensor(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
            scale = self.step_noise(timestep, eta).noise_scale
            variance_noise = variance_noise if scale == 1.0 else variance_noise * scale
            generator = None
        return self.scheduler.step(eps, timestep, sample, eta=eta, generator=generator, variance_noise=variance_noise,
                                   return_dict=True, **kwargs)

    def _ddpm_step(self, eps, timestep, sample, generator, kwargs):
        noise = self.step_noise(timestep)
        shrink = noise.sigma - noise.sigma_corrected
        z = _peek_randn(eps.shape, generator, eps.device, eps.dtype) if shrink > 0 else None
        out = self.scheduler.step(eps, timestep, sample, generator=generator, return_dict=True, **kwargs)
        if z is not None:
            out.prev_sample = out.prev_sample - shrink * z
        return out


def _peek_randn(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The noise `randn_tensor` will draw next with these arguments, leaving the RNG state where it was."""
    if generator is not None:
        generators = generator if isinstance(generator, list) else [generator]
        states = [g.get_state() for g in generators]
        z = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        for g, state in zip(generators, states):
            g.set_state(state)
        return z
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return randn_tensor(shape, generator=None, device=device, dtype=dtype)
