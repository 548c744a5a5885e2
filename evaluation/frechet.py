"""Fréchet distance between feature distributions, with torchmetrics' FID metric and any feature
extractor (the bench classifier's features on the bench). Reference statistics (mean, covariance,
count) can be stored and loaded back instead of recomputed."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


def frechet_metric(extractor: nn.Module) -> FrechetInceptionDistance:
    """A torchmetrics FID whose features come from `extractor` (it keeps its reference set on reset). It computes
    on the images it is given: no gathering across ranks (eval gathers the images itself)."""
    return FrechetInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False)


@torch.no_grad()
def add_images(metric: FrechetInceptionDistance, images: torch.Tensor | Iterable[torch.Tensor], real: bool,
               batch_size: int = 500) -> None:
    chunks = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    for chunk in chunks:
        metric.update(chunk.float(), real=real)


def reference_stats(metric: FrechetInceptionDistance) -> dict[str, torch.Tensor]:
    """Mean, covariance and count of the metric's real (reference) features."""
    n = metric.real_features_num_samples
    mean = metric.real_features_sum / n
    cov = (metric.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    return {"mean": mean.double(), "cov": cov.double(), "num_samples": n.reshape(1).long()}


def load_reference_stats(metric: FrechetInceptionDistance, stats: dict[str, torch.Tensor]) -> None:
    """Set the metric's reference features from stored statistics (the inverse of `reference_stats`)."""
    n = stats["num_samples"].reshape(()).long()
    mean, cov = stats["mean"].double(), stats["cov"].double()
    metric.real_features_num_samples = n.to(metric.real_features_num_samples)
    metric.real_features_sum = mean * n
    metric.real_features_cov_sum = cov * (n - 1) + n * torch.outer(mean, mean)


def frechet_distance(extractor: nn.Module, generated: torch.Tensor, reference: torch.Tensor | dict) -> float:
    """FD between `generated` images and a reference (images, or stored statistics)."""
    metric = frechet_metric(extractor)
    if isinstance(reference, dict):
        load_reference_stats(metric, reference)
    else:
        add_images(metric, reference, real=True)
    add_images(metric, generated, real=False)
    return float(metric.compute())
