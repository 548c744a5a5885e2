"""Sampling for evaluation: fixed seeds, split across ranks, gathered on every rank, as uint8 images.

A seed's starting noise comes from the seed alone and the seed batches are fixed (data/trajectories.py), so
batch i, sampled by rank i % N, gives the same images whatever N is. Unconditional models run diffusers'
scheduler loop (`run_sampler`); text-conditional ones run the reference's diffusers pipeline with the
quantized UNet swapped in and each sample's latents given explicitly.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Sequence

import torch
from ..denoisers import latent_shape, latent_size, num_classes, predicted_noise
from ..data.trajectories import (Conditioning, class_labels, run_sampler, seed_batches, seeded_noise,
                                 step_generator)
from ..progress import progress
from .fidelity import from_uint8, noise_pred_mse, psnr, to_uint8


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


def compare_to_fp(fp_unet, qunet, scheduler, seeds, num_steps: int, batch_size: int = 16, eta: float = 0.0,
                  **pipeline_kwargs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """FP and quantized models sampled from the same seeds with the same sampler, as `qdistill eval` samples them
    (one process). Returns both final batches in [-1, 1] and the metrics: mean PSNR of the quantized samples
    against FP, and the per-step noise-prediction MSE on the FP trajectories' own inputs."""
    seeds = list(seeds)
    q_final = sample_across_ranks(qunet, scheduler, seeds, num_steps, batch_size, eta, desc="quantized samples",
                                  **pipeline_kwargs)
    calls: list = []
    with recorded_calls(fp_unet, calls):
        fp_final = sample_across_ranks(fp_unet, scheduler, seeds, num_steps, batch_size, eta, desc="FP samples",
                                       **pipeline_kwargs)
    eps_mse = noise_pred_mse_per_step(qunet, calls, num_steps)
    fp_final, q_final = from_uint8(fp_final), from_uint8(q_final)
    metrics = {"psnr_db": float(psnr(q_final, fp_final).mean()),
               "noise_pred_mse_mean": sum(eps_mse.values()) / len(eps_mse),
               "noise_pred_mse_per_step": eps_mse, "num_samples": len(seeds)}
    return fp_final, q_final, metrics
