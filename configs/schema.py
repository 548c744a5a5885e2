"""The config dataclasses of the command-line stages. YAML files in this folder fill them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..quantizers import QuantConfig


@dataclass
class CalibrationConfig:
    """Which sampler inputs the activation ranges are calibrated on (Q-Diffusion §3.1: data-free)."""

    num_samples: int = 32
    num_steps: int = 50
    every: int = 5  # keep every k-th step of each trajectory (Q-Diffusion's uniform interval)
    scheduler: Literal["ddim", "ddpm", "dpm"] = "ddim"
    eta: float = 0.0
    seed: int = 0  # samples use seeds seed, seed+1, ...
    batch_size: int = 16

    def __post_init__(self):
        for key in ("num_samples", "num_steps", "every", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"calibration.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class SamplingConfig:
    """How FP and quantized models are compared: same seeds, same sampler."""

    num_samples: int = 16
    num_steps: int = 50
    scheduler: Literal["ddim", "ddpm", "dpm"] = "ddim"
    eta: float = 0.0
    seed: int = 10_000  # disjoint from calibration seeds
    batch_size: int = 16

    def __post_init__(self):
        for key in ("num_samples", "num_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"sampling.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class QuantizeRunConfig:
    """scripts/quantize.py: post-training quantization of one model folder, judged against FP."""

    model: str = "runs/demo-model"
    out: str = "runs/quantized"
    recipe: Literal["rtn"] = "rtn"
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
