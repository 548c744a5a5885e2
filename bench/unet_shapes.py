"""Random-weight models of the shapes in qdistill.model_shapes, saved as diffusers folders (the latency and
scaling benchmarks run on them):

    python -m qdistill.bench.unet_shapes ddpm-cifar10 runs/ddpm-cifar10-shape
"""
from __future__ import annotations

import sys
from pathlib import Path

import diffusers
import torch

from qdistill.model_shapes import SHAPES


def save_random_model(shape: str, folder) -> "Path":
    """A model of `shape` with random weights (seed 0) saved as a diffusers folder (a DDPM pipeline with a DDIM
    scheduler for unconditional UNets, else the bare UNet), unless `folder` already holds one."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
        return folder
    cls_name, config = SHAPES[shape]
    torch.manual_seed(0)
    model = getattr(diffusers, cls_name)(**config)
    if cls_name == "UNet2DModel":
        diffusers.DDPMPipeline(unet=model, scheduler=diffusers.DDIMScheduler()).save_pretrained(folder)
    else:
        model.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        raise SystemExit(f"usage: python -m qdistill.bench.unet_shapes {{{','.join(SHAPES)}}} FOLDER")
    print(save_random_model(sys.argv[1], sys.argv[2]))
