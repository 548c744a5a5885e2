"""Bench tooling around the classifier FD (qdistill.evaluation.classifier_fd): sampling a model's images, and
the FD real images score (the floor a generator's FD compares with)."""
from __future__ import annotations

from pathlib import Path

import torch

from qdistill.data.fashion_mnist import load_fashion_mnist
from qdistill.data.trajectories import class_conditioning, record_trajectories
from qdistill.evaluation.classifier_fd import BenchClassifier, load_test_stats
from qdistill.evaluation.frechet import frechet_distance


def sample_images(unet, scheduler, seeds, num_steps: int, batch_size: int = 100, eta: float = 0.0) -> torch.Tensor:
    """Final samples for `seeds` (fixed batches of seeds, as everywhere in qdistill), in [-1, 1]. A
    class-conditional model (the DiT bench teacher) samples each seed's own label, as eval does."""
    images, _ = record_trajectories(unet, scheduler, list(seeds), num_steps, batch_size, eta, keep_steps=[],
                                    cond_for=class_conditioning(unet))
    return images.clamp(-1, 1)


@torch.no_grad()
def fd_floor(classifier_dir: str | Path, num_samples: int, draws: int, seed: int = 0) -> dict:
    """What real images score: FD of the whole train split to the test split, and of `draws` random sets of
    `num_samples` train images (FD is biased upwards at small sample sizes, so a generator's FD on N samples
    compares with real images' FD on N samples)."""
    classifier = BenchClassifier.load(classifier_dir)
    stats = load_test_stats(classifier_dir)
    train, _ = load_fashion_mnist("train")
    g = torch.Generator().manual_seed(seed)
    subsets = [frechet_distance(classifier.features, train[torch.randperm(len(train), generator=g)[:num_samples]], stats)
               for _ in range(draws)]
    return {"fd_train_vs_test": frechet_distance(classifier.features, train, stats),
            f"fd_{num_samples}_train_images_vs_test": {"mean": sum(subsets) / draws,
                                                       "draws": [round(x, 4) for x in subsets]}}
