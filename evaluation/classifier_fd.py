"""Fréchet distance in a classifier's features: the metric `qdistill eval` reports as `fd` for 1×32×32 models.

The classifier is a small CNN (`assets/classifier` ships one trained on Fashion-MNIST) whose penultimate
features define the distance; its folder holds safetensors + JSON and the reference split's feature statistics,
so scoring needs no data set. `classifier_quality` gives the FD of a set of images and the share of each class."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.fashion_mnist import CLASSES
from ..errors import QdistillError
from ..files import shipped
from .frechet import frechet_distance

WEIGHTS, CONFIG, TEST_STATS = "model.safetensors", "config.json", "test_feature_stats.safetensors"


class ConvFeatures(nn.Sequential):
    """Images [N, 1, 32, 32] in [-1, 1] → penultimate features [N, num_features]."""

    def __init__(self, width: int = 32, num_features: int = 128):
        super().__init__(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * width * 16, num_features), nn.ReLU(),
        )
        self.num_features = num_features  # torchmetrics reads this for a custom feature extractor


class BenchClassifier(nn.Module):
    def __init__(self, width: int = 32, num_features: int = 128, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "num_features": num_features, "num_classes": num_classes}
        self.features = ConvFeatures(width, num_features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def save(self, path: str | Path, test_stats: dict[str, torch.Tensor] | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))
        (path / CONFIG).write_text(json.dumps(self.config, indent=2))
        if test_stats is not None:
            save_file(test_stats, str(path / TEST_STATS))

    @classmethod
    def load(cls, path: str | Path) -> "BenchClassifier":
        path = shipped(path)
        if not (path / WEIGHTS).is_file():
            raise QdistillError(f"bench classifier not found: {path / WEIGHTS}")
        model = cls(**json.loads((path / CONFIG).read_text()))
        model.load_state_dict(load_file(str(path / WEIGHTS)))
        return model.eval()


def load_test_stats(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(shipped(path) / TEST_STATS))


@torch.no_grad()
def classifier_quality(images: torch.Tensor, classifier_dir: str | Path) -> dict:
    """FD of `images` (in [-1, 1]) to the classifier's stored reference statistics, and the predicted class
    shares."""
    classifier = BenchClassifier.load(classifier_dir)
    fd = frechet_distance(classifier.features, images, load_test_stats(classifier_dir))
    preds = torch.cat([classifier(x).argmax(1) for x in images.split(500)])
    shares = torch.bincount(preds, minlength=len(CLASSES)).float() / len(preds)
    return {"fd": fd, "class_shares": {name: round(float(s), 4) for name, s in zip(CLASSES, shares)},
            "min_class_share": float(shares.min())}
