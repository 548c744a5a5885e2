"""The bench dataset: Fashion-MNIST from the Debian package `dataset-fashion-mnist` (idx files, gzip).
Images come back as float tensors in [-1, 1], padded from 28×28 to 32×32 with the background value."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetMissingError  # noqa: F401 (raised here; defined with the other user-facing errors)

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")



def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(f"{path} is not an idx file (magic {got:#x}, expected {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {array.size} values for shape {shape}")
    return array.reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path = DEFAULT_ROOT, pad_to: int = 32):
    """(images [N, 1, pad_to, pad_to] in [-1, 1], labels [N] int64)."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images_file, labels_file = (root / f for f in FILES[split])
    if not images_file.is_file() or not labels_file.is_file():
        raise DatasetMissingError(
            f"Fashion-MNIST not found under {root} (missing {images_file.name}); install it with: "
            "apt-get update && apt-get install -y dataset-fashion-mnist")
    images = torch.from_numpy(_read_idx(images_file, 0x803).copy()).float().div_(127.5).sub_(1.0)[:, None]
    labels = torch.from_numpy(_read_idx(labels_file, 0x801).astype(np.int64))
    pad = (pad_to - images.shape[-1]) // 2
    if pad > 0:
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=-1.0)
    return images, labels
