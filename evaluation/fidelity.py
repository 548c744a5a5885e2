"""Fidelity to the FP model on the same seeds: PSNR of final samples, per-step noise-prediction MSE, per-block
output MSE, and an image grid FP | quantized. Sampling both models for them is evaluation/sampling.py's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.trajectories import predicted_noise, to_device
from ..quantizers import block_output


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8, as samples are saved, shown and compared."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


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
        imgs = to_uint8(images).cpu().numpy()  # B C H W
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
