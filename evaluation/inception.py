"""Inception-style metrics (FID, sFID, IS) from a local feature network file; nothing is downloaded.

The file is a `torch.export` program (.pt2) or a TorchScript module, called on uint8 images [N, 3, H, W] (0–255; grayscale is repeated to three
channels) that returns the pool features [N, D], or a dict with "pool" and optionally "logits" [N, K]
(for IS) and "spatial" [N, C, h, w] (for sFID: the first 7 channels, flattened, as ADM's evaluator uses
mixed_6/conv). A TorchScript export of Inception-v3 (e.g. a wrapper around NVIDIA's
inception-2015-12-05.pt) fits. FD and IS are torchmetrics' implementations with this network as the feature.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.inception import InceptionScore

from ..errors import ConfigError
from .frechet import frechet_metric


class FeatureOutput(nn.Module):
    """One output of the feature network, as torchmetrics' `feature=` module (with `num_features`)."""

    def __init__(self, network: nn.Module, key: str, num_features: int):
        super().__init__()
        self.network, self.key, self.num_features = network, key, num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.network(to_rgb_uint8(images))
        if not isinstance(out, dict):
            out = {"pool": out}
        x = out[self.key]
        return x[:, :7].flatten(1) if self.key == "spatial" else x


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def load_feature_network(path: str | Path) -> nn.Module:
    """A `torch.export` program (.pt2, `torch.export.save`) or a TorchScript file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key 'inception': feature network file not found: {path}")
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 - both loaders raise assorted errors on a foreign file
        raise ConfigError(f"{path} is not a feature network (torch.export .pt2 or TorchScript): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


@torch.no_grad()
def inception_metrics(network: nn.Module, generated: torch.Tensor, reference: torch.Tensor,
                      batch_size: int = 100) -> dict[str, float]:
    """FID (and sFID, IS where the network gives spatial features / logits) of uint8 `generated` images
    against uint8 `reference` images."""
    probe = network(to_rgb_uint8(generated[:2]))
    outputs = probe if isinstance(probe, dict) else {"pool": probe}
    metrics = {}
    for key, name in (("pool", "fid"), ("spatial", "sfid")):
        if key not in outputs:
            continue
        dim = outputs[key][:, :7].flatten(1).shape[1] if key == "spatial" else outputs[key].shape[1]
        metric = frechet_metric(FeatureOutput(network, key, dim))
        for chunk in reference.split(batch_size):
            metric.update(chunk, real=True)
        for chunk in generated.split(batch_size):
            metric.update(chunk, real=False)
        metrics[name] = float(metric.compute())
    if "logits" in outputs:
        score = InceptionScore(feature=FeatureOutput(network, "logits", outputs["logits"].shape[1]),
                               splits=min(10, len(generated)), sync_on_compute=False)
        for chunk in generated.split(batch_size):
            score.update(chunk)
        metrics["is"] = float(score.compute()[0])
    return metrics
