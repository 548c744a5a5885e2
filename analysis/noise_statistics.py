"""PTQD's statistics measured: the quantized model run on FP trajectory inputs, its noise prediction compared
with the FP one step by step (the moments and the fit are quantizers/noise_correction.py's)."""
from __future__ import annotations

from typing import Iterable

import torch

from ..data.trajectories import predict_noise
from ..quantizers.noise_correction import NoiseCorrection, NoiseMoments


@torch.no_grad()
def measure_noise_correction(qunet: torch.nn.Module, records: Iterable) -> NoiseCorrection:
    """Run the quantized UNet on FP trajectory inputs (`StepRecord`s of `record_trajectories(...,
    keep_steps=None)`: `.sample`, `.timestep`, `.noise_pred`, `.cond`) and estimate the statistics. With
    conditioning, the prediction measured is the one the sampler uses (the guided one under guidance)."""
    moments = NoiseMoments()
    device = next(qunet.parameters()).device
    for record in records:
        cond = getattr(record, "cond", None)
        eps_q = predict_noise(qunet, record.sample.to(device), record.timestep.to(device), cond)
        moments.add(record.noise_pred, eps_q, record.timestep)
    return moments.estimate()
