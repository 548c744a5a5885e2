"""Quality of a sampler on the bench: Fréchet distance of its samples to the Fashion-MNIST test split in
the bench classifier's feature space, and the classifier's label distribution over the samples."""
from __future__ import annotations

from pathlib import Path

import torch

from .fashion_mnist import CLASSES
from ..data.trajectories import class_conditioning, record_trajectories
from .classifier_net import BenchClassifier, load_test_stats
from ..evaluation.frechet import frechet_distance


def sample_images(unet, scheduler, seeds, num_steps: int, batch_size: int = 100, eta: float = 0.0) -> torch.Tensor:
    """Final samples for `seeds` (fixed batches of seeds, as everywhere in qdistill), in [-1, 1]. A
    class-conditional model (the DiT bench teacher) samples each seed's own label, as eval does."""
    images, _ = record_trajectories(unet, scheduler, list(seeds), num_steps, batch_size, eta, keep_steps=[],
                                    cond_for=class_conditioning(unet))
    return images.clamp(-1, 1)


@torch.no_grad()
def bench_quality(images: torch.Tensor, classifier_dir: str | Path) -> dict:
    """FD to the test split (stored statistics) and the predicted class shares of `images`."""
    classifier = BenchClassifier.load(classifier_dir)
    fd = frechet_distance(classifier.features, images, load_test_stats(classifier_dir))
    preds = torch.cat([classifier(x).argmax(1) for x in images.split(500)])
    shares = torch.bincount(preds, minlength=len(CLASSES)).float() / len(preds)
    return {"fd": fd, "class_shares": {name: round(float(s), 4) for name, s in zip(CLASSES, shares)},
            "min_class_share": float(shares.min())}


@torch.no_grad()
def fd_floor(classifier_dir: str | Path, num_samples: int, draws: int, seed: int = 0) -> dict:
    """What real images score: FD of the whole train split to the test split, and of `draws` random sets of
    `num_samples` train images (FD is biased upwards at small sample sizes, so a generator's FD on N samples
    compares with real images' FD on N samples)."""
    from .fashion_mnist import load_fashion_mnist

    classifier = BenchClassifier.load(classifier_dir)
    stats = load_test_stats(classifier_dir)
    train, _ = load_fashion_mnist("train")
    g = torch.Generator().manual_seed(seed)
    subsets = [frechet_distance(classifier.features, train[torch.randperm(len(train), generator=g)[:num_samples]], stats)
               for _ in range(draws)]
    return {"fd_train_vs_test": frechet_distance(classifier.features, train, stats),
            f"fd_{num_samples}_train_images_vs_test": {"mean": sum(subsets) / draws,
                                                       "draws": [round(x, 4) for x in subsets]}}
