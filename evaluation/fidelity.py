"""Fidelity to the FP model on the same seeds: PSNR of final samples, per-step noise-prediction MSE,
and an image grid FP | quantized."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.trajectories import predicted_noise, to_device
from ..quantizers import block_output


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of samples in [-1, 1] (clamped, as they are shown)."""
    a = (a.clamp(-1, 1) + 1) / 2
    b = (b.clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def noise_pred_mse(qunet, calls) -> dict[int, float]:
    """Per step, the mean MSE between the quantized model's noise prediction and the FP one on the FP
    trajectory's own inputs; `calls` yields (step, args, kwargs, FP noise prediction)."""
    per_step: dict[int, list[float]] = {}
    device = next(qunet.parameters()).device  # the calls may have been recorded on another device
    for step, args, kwargs, fp_pred in calls:
        out = qunet(*to_device(list(args), device), **to_device(kwargs, device))
        pred = predicted_noise(qunet, out)
        fp_pred = fp_pred.to(pred.device)
        per_step.setdefault(step, []).append((pred - fp_pred).pow(2).mean().item())
    return {step: float(np.mean(v)) for step, v in sorted(per_step.items())}


def save_grid(columns: list[torch.Tensor], path: str | Path, nrow: int = 8) -> Path:
    """Side-by-side grids of samples in [-1, 1]: one grid per tensor, separated by a gap."""
    tiles = []
    for images in columns:
        imgs = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()  # B C H W
        b, c, h, w = imgs.shape
        rows = (b + nrow - 1) // nrow
        grid = np.zeros((c, rows * (h + 2), nrow * (w + 2)), dtype=np.uint8)
        for i in range(b):
            r, col = divmod(i, nrow)
            grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = imgs[i]
        tiles.append(grid)
    gap = np.full((tiles[0].shape[0], tiles[0].shape[1], 8), 255, dtype=np.uint8)
    full = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=2)
    img = full[0] if full.shape[0] == 1 else np.transpose(full[:3], (1, 2, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def compare_to_fp(fp_unet, qunet, scheduler, seeds, num_steps: int, batch_size: int = 16, eta: float = 0.0,
                  cond_for=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sample FP and quantized models from the same seeds with the same sampler (unconditional models, or
    class-conditional ones with `cond_for(batch_seeds)` giving each batch's labels). Returns both final batches
    and the metrics: mean PSNR of the quantized samples against FP, and the per-step noise-prediction MSE on the
    FP trajectory's inputs."""
    from ..data.trajectories import (latent_shape, model_kwargs, record_trajectories, run_sampler, seed_batches,
                                     seeded_noise, step_generator)

    seeds = list(seeds)
    fp_final, fp_records = record_trajectories(fp_unet, scheduler, seeds, num_steps, batch_size, eta,
                                               cond_for=cond_for)
    shape = latent_shape(fp_unet)
    q_final = torch.cat([run_sampler(qunet, scheduler, seeded_noise(chunk, shape), num_steps, eta,
                                     generator=step_generator(chunk), cond=cond_for(chunk) if cond_for else None)
                         for chunk in seed_batches(seeds, batch_size)])
    eps_mse = noise_pred_mse(qunet, ((r.step, (), {**model_kwargs(qunet, r.sample, r.timestep),
                                                   **(r.cond.model_kwargs() if r.cond else {})}, r.noise_pred)
                                     for r in fp_records))
    metrics = {"psnr_db": float(psnr(q_final, fp_final).mean()),
               "noise_pred_mse_mean": float(np.mean(list(eps_mse.values()))),
               "noise_pred_mse_per_step": eps_mse, "num_samples": len(seeds)}
    return fp_final, q_final, metrics


@torch.no_grad()
def block_output_mse(fp_unet, qunet, blocks_fp, blocks_q, batches) -> dict[str, float]:
    """Per block: MSE between its output in the quantized model and in the FP model, each model run on its
    own chain from the same model inputs (so a block's error includes what the blocks before it left)."""
    def outputs(model, blocks, kwargs):
        seen: dict[str, torch.Tensor] = {}
        hooks = [b.module.register_forward_hook(
            lambda m, a, o, name=b.name: seen.setdefault(name, block_output(o).float()))
            for b in blocks]
        try:
            model(**kwargs)
        finally:
            for h in hooks:
                h.remove()
        return seen

    total: dict[str, float] = {}
    count = 0
    for kwargs in batches:
        fp, q = outputs(fp_unet, blocks_fp, kwargs), outputs(qunet, blocks_q, kwargs)
        for name in fp:
            total[name] = total.get(name, 0.0) + (q[name] - fp[name]).pow(2).mean().item()
        count += 1
    return {name: value / count for name, value in total.items()}
