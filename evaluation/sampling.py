"""Sampling for evaluation: fixed seeds, split across ranks, gathered on every rank, as uint8 images.

A seed's starting noise comes from the seed alone and the seed batches are fixed (data/trajectories.py), so
batch i, sampled by rank i % N, gives the same images whatever N is. Unconditional models run diffusers'
scheduler loop (`run_sampler`); text-conditional ones run the reference's diffusers pipeline with the
quantized UNet swapped in and each sample's latents given explicitly.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Sequence

import torch
from ..denoisers import latent_shape, latent_size, num_classes, predicted_noise
from ..data.trajectories import (Conditioning, class_labels, run_sampler, seed_batches, seeded_noise,
                                 step_generator)
from ..distributed_env import rank_environment
from ..progress import progress
from .fidelity import noise_pred_mse


def init_eval_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank): a gloo group under torchrun or srun, no group for a plain run."""
    with rank_environment() as (rank, world):
        local_rank = int(os.environ["LOCAL_RANK"])  # srun's is taken back with the rest at the end
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
    return rank, world, local_rank


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 as the images are saved."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


@torch.no_grad()
def sample_batch(unet, scheduler, seeds: Sequence[int], num_steps: int, eta: float = 0.0, pipeline=None,
                 prompts: Sequence[str] | None = None, guidance_scale: float = 1.0, size: int | None = None
                 ) -> torch.Tensor:
    """Final samples of one seed batch in [-1, 1]. A class-conditional model samples each seed's own label
    (balanced over the classes, as calibration records them). `size`: the latent's height and width (default
    the model's, `denoisers.latent_size`)."""
    generator = step_generator(seeds)
    noise = seeded_noise(seeds, latent_shape(unet, size))
    if pipeline is None:
        n = num_classes(unet)
        cond = Conditioning(class_labels=class_labels(seeds, n)) if n else None
        return run_sampler(unet, scheduler, noise, num_steps, eta, generator=generator, cond=cond)
    setattr(pipeline, "transformer" if hasattr(pipeline, "transformer") else "unet", unet)
    pipeline.scheduler = scheduler
    params = inspect.signature(pipeline.__call__).parameters
    extra = {"eta": eta} if "eta" in params else {}
    if "height" in params:  # the image size of the latents given (a pipeline's default may be another size)
        extra["height"], extra["width"] = (n * getattr(pipeline, "vae_scale_factor", 8) for n in latent_size(unet, size))
    if "use_resolution_binning" in params:  # PixArt would map the size to an aspect-ratio bin: keep the latents'
        extra["use_resolution_binning"] = False
    out = pipeline(prompt=[prompts[s % len(prompts)] for s in seeds], latents=noise, num_inference_steps=num_steps,
                   guidance_scale=guidance_scale, generator=generator, output_type="pt", **extra)
    return out.images * 2 - 1  # "pt" output: [B, C, H, W] in [0, 1]


def sample_across_ranks(unet, scheduler, seeds: Sequence[int], num_steps: int, batch_size: int, eta: float = 0.0,
                        rank: int = 0, world: int = 1, desc: str = "sampling", **pipeline_kwargs) -> torch.Tensor:
    """uint8 samples of all `seeds` (in seed order) on every rank; each rank samples batches i % world."""
    batches = seed_batches(list(seeds), batch_size)
    mine = {}
    for i in progress(range(rank, len(batches), world), desc, disable=rank != 0):
        mine[i] = to_uint8(sample_batch(unet, scheduler, batches[i], num_steps, eta, **pipeline_kwargs)).cpu()
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        mine = {i: images for part in gathered for i, images in part.items()}
    return torch.cat([mine[i] for i in range(len(batches))])


@contextlib.contextmanager
def recorded_calls(unet, calls: list):
    """Record every call of `unet`: its positional and keyword inputs and its noise prediction."""
    def hook(module, args, kwargs, output):
        pred = predicted_noise(module, output)
        calls.append({"args": [a.clone() if torch.is_tensor(a) else a for a in args],
                      "kwargs": {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                      "noise_pred": pred.clone()})

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def noise_pred_mse_per_step(qunet, calls: list, num_steps: int) -> dict[int, float]:
    """Per denoising step, the quantized model's noise-prediction MSE on recorded FP calls (in order:
    num_steps per seed batch)."""
    return noise_pred_mse(qunet, ((i % num_steps, c["args"], c["kwargs"], c["noise_pred"]) for i, c in enumerate(calls)))
