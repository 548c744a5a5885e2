"""Where and in what precision a stage runs: `device=auto|cpu|cuda` and `precision=fp32|bf16|fp16`.

auto is CUDA when torch sees a GPU, else the CPU. A rank's GPU is LOCAL_RANK modulo the GPUs it sees (a
launcher that hands each task one visible GPU gives every rank cuda:0). bf16 and fp16 run the forwards under
autocast while parameters, quantizer state, the loss and the optimizer stay in fp32 (fp16's narrow range needs
loss scaling: trainer/distill.py has DeepSpeed do it). On CUDA, TF32 matmuls are on (fp32
training at tensor-core speed). (A float64 run is not offered: DeepSpeed reduces fp16, bf16 and fp32 gradients
only; the tests use float64 models below the engine as a proxy for device mistakes.)
"""
from __future__ import annotations

import contextlib
import os

import torch

from .errors import ConfigError


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device for config value `name` on this rank."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config key 'device' must be auto, cpu or cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def autocast(device: torch.device, precision: str):
    """The context the forwards of a `precision` run execute in."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def cast_inputs(kwargs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Model inputs on `device`, floating ones in `dtype` (integer labels and ids keep theirs); nested dicts
    (added_cond_kwargs) too."""
    def cast(v):
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        if torch.is_tensor(v):
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)
        return v

    return {k: cast(v) for k, v in kwargs.items()}
