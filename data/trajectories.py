"""Sampler trajectories of a diffusers UNet: the inputs (x_t, t, conditioning) the model sees at every
step, and its noise predictions. Calibration data for quantization (Q-Diffusion §3.1): data-free.

The loop is diffusers' own: `scheduler.set_timesteps`, `scale_model_input`, `unet(...)`, `scheduler.step`.
Each sample's starting noise comes from its own seed, so a sample is the same whichever batch or rank
draws it; stochastic schedulers (DDPM, DDIM η > 0) draw their step noise from a generator seeded by the
batch, so batches must be formed the same way (see `seed_batches`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..denoisers import (is_flux, latent_shape, model_kwargs, model_timestep, num_classes,  # noqa: F401 (re-exported)
                         predicted_noise)


# The seed conventions every stage shares (calibration, training's fidelity check, export's PTQD measurements,
# eval): a sample's starting noise and class label come from its own seed; a batch's step noise (DDPM, DDIM
# η > 0) from a generator seeded by the batch's first seed, so batches must be formed by `seed_batches`.
def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def step_generator(batch_seeds: Sequence[int]) -> torch.Generator:
    """The generator of a seed batch's step noise."""
    return torch.Generator().manual_seed(int(batch_seeds[0]) + 7919)


def class_labels(seeds: Sequence[int], num_classes: int) -> torch.Tensor:
    """Each sample's class label: balanced over the classes along consecutive seeds."""
    return torch.tensor([int(s) % num_classes for s in seeds])


def seed_batches(seeds: Sequence[int], batch_size: int) -> list[list[int]]:
    """Fixed batches of the global seed list: the unit of work a rank takes (batch i goes to rank i % N),
    so results do not depend on the number of ranks."""
    seeds = list(seeds)
    return [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]


@dataclass
class Conditioning:
    """What a conditional UNet is given besides (x_t, t), per sample. Guidance (scale > 1 with a negative
    embedding) runs the unconditional and conditional halves in one batch of 2B, as diffusers pipelines do.
    SDXL-class UNets (addition_embed_type "text_time") also take the pooled text embedding and the
    micro-conditioning `time_ids` as `added_cond_kwargs`."""

    encoder_hidden_states: torch.Tensor | None = None  # [B, L, D]
    negative_encoder_hidden_states: torch.Tensor | None = None  # [B, L, D]
    class_labels: torch.Tensor | None = None  # [B]
    guidance_scale: float = 1.0
    text_embeds: torch.Tensor | None = None  # [B, P] pooled (SDXL)
    negative_text_embeds: torch.Tensor | None = None  # [B, P]
    time_ids: torch.Tensor | None = None  # [B, 6]: original size, crop top-left, target size (SDXL)
    pooled_projections: torch.Tensor | None = None  # [B, P] pooled text (SD3, Flux)
    negative_pooled_projections: torch.Tensor | None = None  # [B, P]
    guidance: torch.Tensor | None = None  # [B] Flux's distilled guidance scale, an input of the model (not CFG)
    encoder_attention_mask: torch.Tensor | None = None  # [B, L] PixArt's caption mask
    negative_encoder_attention_mask: torch.Tensor | None = None  # [B, L]

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0 and self.negative_encoder_hidden_states is not None

    def model_kwargs(self) -> dict:
        kw = {}
        if self.class_labels is not None:
            kw["class_labels"] = self.class_labels
        if self.encoder_hidden_states is not None:
            kw["encoder_hidden_states"] = (torch.cat([self.negative_encoder_hidden_states, self.encoder_hidden_states])
                                           if self.guided else self.encoder_hidden_states)
        if self.pooled_projections is not None:
            kw["pooled_projections"] = (torch.cat([self.negative_pooled_projections, self.pooled_projections])
                                        if self.guided else self.pooled_projections)
        if self.guidance is not None:
            kw["guidance"] = torch.cat([self.guidance] * 2) if self.guided else self.guidance
        if self.encoder_attention_mask is not None:
            kw["encoder_attention_mask"] = (torch.cat([self.negative_encoder_attention_mask, self.encoder_attention_mask])
                                            if self.guided else self.encoder_attention_mask)
        if self.text_embeds is not None:  # the negative half's time_ids are the positive's, as in diffusers
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.cat([self.negative_text_embeds, self.text_embeds]) if self.guided
                else self.text_embeds,
                "time_ids": torch.cat([self.time_ids] * 2) if self.guided else self.time_ids}
        return kw

    def select(self, j: int) -> "Conditioning":
        """Sample j's conditioning: each tensor indexed by j (one calibration row's values)."""
        pick = lambda v: None if v is None else v[j]  # noqa: E731
        return Conditioning(pick(self.encoder_hidden_states), pick(self.negative_encoder_hidden_states),
                            pick(self.class_labels), self.guidance_scale, pick(self.text_embeds),
                            pick(self.negative_text_embeds), pick(self.time_ids), pick(self.pooled_projections),
                            pick(self.negative_pooled_projections), pick(self.guidance),
                            pick(self.encoder_attention_mask), pick(self.negative_encoder_attention_mask))


def class_conditioning(model) -> Callable[[list[int]], Conditioning] | None:
    """batch_seeds → Conditioning with each seed's label (`class_labels`), for a class-conditional model; None
    for any other. Calibration, quantize, train and eval draw labels this one way."""
    n = num_classes(model)
    return (lambda seeds: Conditioning(class_labels=class_labels(seeds, n))) if n else None


def to_device(value, device):
    """Tensors in `value` (nested dicts, lists, tuples) moved to `device`."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def predict_noise(unet, model_input: torch.Tensor, t, cond: Conditioning | None = None) -> torch.Tensor:
    """The (guided) prediction the sampler steps with (any diffusers denoiser: its inputs by name; `t` as the
    model takes it, `model_timestep`)."""
    kwargs = {} if cond is None else to_device(cond.model_kwargs(), model_input.device)
    text = kwargs["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in kwargs else None
    if cond is None or not cond.guided:
        return predicted_noise(unet, unet(**model_kwargs(unet, model_input, t, text), **kwargs))
    if torch.is_tensor(t) and t.dim() == 1:  # per-sample timesteps: both halves
        t = torch.cat([t, t])
    both = unet(**model_kwargs(unet, torch.cat([model_input, model_input]), t, text), **kwargs)
    uncond, text = predicted_noise(unet, both).chunk(2)
    return uncond + cond.guidance_scale * (text - uncond)


@torch.no_grad()
def run_sampler(unet, scheduler, noise: torch.Tensor, num_steps: int, eta: float = 0.0,
                on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                generator: torch.Generator | None = None, cond: Conditioning | None = None) -> torch.Tensor:
    """Denoise `noise` in `num_steps` steps; `on_step(i, t, model_input, noise_pred)` sees every step, with `t` as
    the model is called with it. Flow-matching schedulers (SD3, Flux) are set up as their pipelines do."""
    set_sampler_timesteps(scheduler, num_steps, unet, noise)
    step_params = inspect.signature(scheduler.step).parameters
    extra = {}
    if "eta" in step_params:
        extra["eta"] = eta
    if "generator" in step_params:
        extra["generator"] = generator
    param = next(unet.parameters(), None)  # seeds' noise is drawn on the CPU; it runs where the model is
    x = (noise if param is None else noise.to(param.device, param.dtype)) * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        t_model = model_timestep(unet, t)
        eps = predict_noise(unet, model_input, t_model, cond)
        if on_step is not None:
            on_step(i, t_model, model_input, eps)
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


def is_flow_matching(scheduler) -> bool:
    return "FlowMatch" in type(scheduler).__name__


def set_sampler_timesteps(scheduler, num_steps: int, model, noise: torch.Tensor) -> None:
    """`scheduler.set_timesteps` as the model's pipeline calls it: a flow-matching scheduler with dynamic shifting
    gets the shift μ of the image's token count (linear between the config's base and max sequence lengths), and
    Flux pipelines pass their σ from 1 to 1/steps."""
    if not is_flow_matching(scheduler):
        scheduler.set_timesteps(num_steps)
        return
    kw = {}
    if is_flux(model) and not scheduler.config.get("use_flow_sigmas"):
        kw["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    if scheduler.config.get("use_dynamic_shifting"):
        tokens = noise.shape[1] if is_flux(model) else noise.shape[-2] * noise.shape[-1] // model.config.patch_size**2
        c = scheduler.config
        lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        slope = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (hi - lo)
        kw["mu"] = c.get("base_shift", 0.5) + slope * (tokens - lo)
    scheduler.set_timesteps(num_steps, **kw)


@dataclass
class StepRecord:
    """One UNet call on the trajectory: the batch of inputs at one step and the FP noise prediction."""

    step: int
    timestep: torch.Tensor  # [B]
    sample: torch.Tensor  # [B, C, H, W], the UNet's input
    noise_pred: torch.Tensor  # [B, C, H, W]
    seeds: list[int] = field(default_factory=list)
    cond: Conditioning | None = None  # the batch's conditioning (a guided prediction runs both halves)


def record_trajectories(unet, scheduler, seeds: Sequence[int], num_steps: int, batch_size: int = 16,
                        eta: float = 0.0, keep_steps: Sequence[int] | None = None,
                        cond_for: Callable[[list[int]], Conditioning | None] | None = None,
                        size: int | None = None) -> tuple[torch.Tensor, list[StepRecord]]:
    """Run the sampler on `seeds` in fixed batches; return the final samples and the records of the steps
    in `keep_steps` (all steps when None). `cond_for(batch_seeds)` gives each batch's conditioning; `size` is the
    latent's height and width (default the model's, `denoisers.latent_size`)."""
    keep = None if keep_steps is None else set(keep_steps)
    finals, records = [], []
    shape = latent_shape(unet, size)
    for chunk in seed_batches(seeds, batch_size):

        def on_step(i, t, model_input, eps):
            if keep is None or i in keep:
                records.append(StepRecord(i, torch.full((len(chunk),), float(t), device=model_input.device),
                                          model_input.clone(), eps.clone(), list(chunk), cond))

        generator = step_generator(chunk)
        cond = cond_for(chunk) if cond_for is not None else None
        finals.append(run_sampler(unet, scheduler, seeded_noise(chunk, shape), num_steps, eta, on_step, generator,
                                  cond))
    return torch.cat(finals), records


def uniform_steps(num_steps: int, every: int) -> list[int]:
    """Q-Diffusion's uniform interval: every `every`-th step, starting from the first."""
    if every < 1:
        raise ValueError(f"step interval must be >= 1, got {every}")
    return list(range(0, num_steps, every))


def random_steps(seed: int, num_steps: int, count: int) -> list[int]:
    """PTQD-style random selection: `count` distinct steps of one trajectory, drawn from the sample's seed."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"random selection needs 1 <= steps per sample <= {num_steps}, got {count}")
    perm = torch.randperm(num_steps, generator=torch.Generator().manual_seed(int(seed) + 104729))
    return sorted(perm[:count].tolist())
