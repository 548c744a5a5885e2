"""The FP reference of an evaluation (samples on the eval seeds, and the FP trajectory's UNet calls for the
per-step noise-prediction MSE), cached by the model's hash and the sampling settings, so repeated evals of
quantized models do not resample the FP model. Written atomically."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_dir

IMAGES, CALLS, META = "fp_samples.safetensors", "fp_calls.pt", "meta.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qdistill" / "fp_reference"


def reference_key(settings: dict) -> str:
    """`settings` must hold the model hash and everything that changes the samples."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def load_reference(cache_dir: str | Path, key: str) -> tuple[torch.Tensor, list] | None:
    folder = Path(cache_dir) / key
    if not (folder / META).is_file():
        return None
    try:
        images = load_file(str(folder / IMAGES))["images"]
        calls = torch.load(folder / CALLS, weights_only=True)
    except Exception:  # a damaged cache entry is recomputed, not trusted
        return None
    return images, calls


def save_reference(cache_dir: str | Path, key: str, settings: dict, images: torch.Tensor, calls: list) -> Path:
    folder = Path(cache_dir) / key
    with atomic_dir(folder) as tmp:
        save_file({"images": images.contiguous()}, str(tmp / IMAGES))
        torch.save(calls, tmp / CALLS)
        (tmp / META).write_text(json.dumps(settings, indent=2))
    return folder
