"""PTQD's quantization-noise statistics (docs/design.md §3.7): how the quantized UNet's noise prediction ε_q
departs from the FP one ε on the FP trajectory, per denoising step.

With Δ_t = ε_q − ε at timestep t, split into a part correlated with ε, a per-channel bias and a residual:

    Δ_t = k_t·ε + b_t[c] + r_t           (k_t and b_t by least squares, r_t the rest)
    ε̂  = (ε_q − b_t) / (1 + k_t)         the corrected prediction
    σ_q(t) = std(r_t) / (1 + k_t)         the std of what remains in ε̂ − ε

k_t is fitted jointly with the per-channel intercepts: k_t = pooled within-channel cov(Δ, ε) / var(ε),
b_t[c] = mean(Δ_c) − k_t·mean(ε_c). Statistics are accumulated as per-(timestep, channel) moment sums in
float64, so any number of records, steps and channels is measured in one streaming pass.

Sampling with the correction (and the variance-schedule calibration that uses σ_q) is
`quantizers/corrected_scheduler.py`; running a model over FP trajectories to fill the moments is
qdistill.analysis.noise_statistics. No I/O here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

STATE_KEYS = ("timesteps", "k", "bias", "sigma")


@dataclass
class NoiseCorrection:
    """Per-step PTQD statistics: one row per measured timestep (ascending).

    timesteps [S] float, k [S] (correlated slope), bias [S, C] (per channel), sigma [S] (residual std of the
    corrected prediction). A timestep that was not measured uses the nearest measured one, as the
    TemporalQuantizer's tables do."""

    timesteps: torch.Tensor
    k: torch.Tensor
    bias: torch.Tensor
    sigma: torch.Tensor

    def __post_init__(self) -> None:
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.float32).reshape(-1)
        self.k = torch.as_tensor(self.k, dtype=torch.float32).reshape(-1)
        self.bias = torch.as_tensor(self.bias, dtype=torch.float32)
        self.sigma = torch.as_tensor(self.sigma, dtype=torch.float32).reshape(-1)
        steps = self.timesteps.numel()
        if steps == 0:
            raise ValueError("NoiseCorrection needs at least one timestep")
        rows = (self.k.numel(), self.sigma.numel(), self.bias.shape[0] if self.bias.dim() == 2 else -1)
        if rows != (steps, steps, steps):
            raise ValueError(f"NoiseCorrection shapes disagree: timesteps {tuple(self.timesteps.shape)}, "
                             f"k {tuple(self.k.shape)}, bias {tuple(self.bias.shape)} (want [S, C]), "
                             f"sigma {tuple(self.sigma.shape)}")
        if not all(torch.isfinite(v).all() for v in (self.timesteps, self.k, self.bias, self.sigma)):
            raise ValueError("NoiseCorrection holds non-finite values")
        if (self.k <= -1).any():  # ε̂ = (ε_q − b)/(1 + k) would flip or blow up
            raise ValueError(f"NoiseCorrection slope k must be > -1 at every step; got min {self.k.min().item():.4g}")
        if (self.sigma < 0).any():
            raise ValueError("NoiseCorrection sigma must be >= 0")

    @property
    def num_channels(self) -> int:
        return self.bias.shape[1]

    @classmethod
    def zeros(cls, timesteps: Iterable[float] | torch.Tensor, channels: int) -> NoiseCorrection:
        """No correction at all: ε̂ = ε_q and no change to the sampler's noise."""
        t = torch.as_tensor(list(timesteps) if not torch.is_tensor(timesteps) else timesteps, dtype=torch.float32)
        steps = t.numel()
        return cls(t, torch.zeros(steps), torch.zeros(steps, channels), torch.zeros(steps))

    def row(self, timestep: float | torch.Tensor) -> int:
        """Index of the nearest measured timestep (ties go to the smaller one, like argmin)."""
        return int((self.timesteps - float(timestep)).abs().argmin())

    def correct(self, eps_q: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """ε̂ = (ε_q − b_t)/(1 + k_t) for a batch [B, C, ...] at one timestep."""
        if eps_q.dim() < 2 or eps_q.shape[1] != self.num_channels:
            raise ValueError(f"noise prediction of shape {tuple(eps_q.shape)} does not have the "
                             f"{self.num_channels} channels the correction was measured with")
        i = self.row(timestep)
        bias = self.bias[i].to(device=eps_q.device, dtype=eps_q.dtype).view(1, -1, *([1] * (eps_q.dim() - 2)))
        return (eps_q - bias) / (1.0 + float(self.k[i]))

    def residual_std(self, timestep: float | torch.Tensor) -> float:
        return float(self.sigma[self.row(timestep)])

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-ready)."""
        return {key: getattr(self, key).contiguous().clone() for key in STATE_KEYS}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> NoiseCorrection:
        missing = [key for key in STATE_KEYS if key not in tensors]
        if missing:
            raise KeyError(f"noise correction tensors lack {missing}")
        return cls(**{key: tensors[key] for key in STATE_KEYS})


class NoiseMoments:
    """Running per-(timestep, channel) sums of ε, Δ and their products (float64): what the least-squares
    fit needs, without holding every prediction in memory."""

    def __init__(self) -> None:
        self._sums: dict[float, torch.Tensor] = {}  # timestep -> [6, C]: n, Σε, ΣΔ, Σε², ΣΔ², ΣεΔ

    def add(self, eps_fp: torch.Tensor, eps_q: torch.Tensor, timesteps: torch.Tensor) -> None:
        """A batch of predictions [B, C, ...] with their per-sample timesteps [B] (or one scalar)."""
        if eps_fp.shape != eps_q.shape or eps_fp.dim() < 2:
            raise ValueError(f"FP and quantized predictions must share a [B, C, ...] shape; got "
                             f"{tuple(eps_fp.shape)} and {tuple(eps_q.shape)}")
        batch, channels = eps_fp.shape[:2]
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"{t.numel()} timesteps given for a batch of {batch}")
        e = eps_fp.detach().double().cpu().reshape(batch, channels, -1)
        d = eps_q.detach().double().cpu().reshape(batch, channels, -1) - e
        for key in t.unique().tolist():
            pick = t == key
            es, ds = e[pick], d[pick]
            sums = torch.stack([torch.full((channels,), float(es.shape[0] * es.shape[2]), dtype=torch.float64),
                                es.sum((0, 2)), ds.sum((0, 2)), (es * es).sum((0, 2)), (ds * ds).sum((0, 2)),
                                (es * ds).sum((0, 2))])
            if key in self._sums and self._sums[key].shape != sums.shape:
                raise ValueError(f"timestep {key}: {channels} channels now, {self._sums[key].shape[1]} before")
            self._sums[key] = self._sums[key] + sums if key in self._sums else sums

    def estimate(self) -> NoiseCorrection:
        if not self._sums:
            raise ValueError("no predictions were added: nothing to estimate the noise correction from")
        keys = sorted(self._sums)
        ks, biases, sigmas = [], [], []
        for key in keys:
            n, se, sd, see, sdd, sed = self._sums[key]
            # centred per-channel sums: the intercepts b_c absorb each channel's mean
            cee, cdd, ced = see - se * se / n, sdd - sd * sd / n, sed - se * sd / n
            var = cee.sum()
            if var <= 0:
                raise ValueError(f"timestep {key}: the FP noise prediction has no variance; the slope is undefined")
            k = ced.sum() / var
            if k <= -1:
                raise ValueError(f"timestep {key}: slope k = {k.item():.4g} <= -1, the quantized prediction is "
                                 "anti-correlated with the FP one and cannot be corrected")
            bias = sd / n - k * se / n
            rss = (cdd - 2 * k * ced + k * k * cee).sum().clamp_min(0)
            dof = max(n.sum().item() - n.numel() - 1, 1.0)  # C intercepts and one slope were fitted
            ks.append(k)
            biases.append(bias)
            sigmas.append((rss / dof).sqrt() / (1 + k))
        return NoiseCorrection(torch.tensor(keys), torch.stack(ks), torch.stack(biases), torch.stack(sigmas))


def estimate_noise_correction(eps_fp: torch.Tensor, eps_q: torch.Tensor, timesteps: torch.Tensor) -> NoiseCorrection:
    """PTQD statistics from FP and quantized predictions [N, C, ...] on the same inputs, rows grouped by
    their timesteps [N]."""
    moments = NoiseMoments()
    moments.add(eps_fp, eps_q, timesteps)
    return moments.estimate()
