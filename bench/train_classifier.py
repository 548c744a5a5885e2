"""Training the bench classifier on Fashion-MNIST (padded to 32×32, in [-1, 1])."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qdistill.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from qdistill.evaluation.classifier_fd import BenchClassifier
from qdistill.evaluation.frechet import add_images, frechet_metric, reference_stats
from qdistill.configs import load_config
from qdistill.errors import QdistillError
from qdistill.files import atomic_dir


@dataclass
class ClassifierConfig:
    out: str = "assets/classifier"
    data_root: str = str(DEFAULT_ROOT)
    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default


@torch.no_grad()
def accuracy(model: BenchClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    preds = torch.cat([model(x).argmax(1) for x in images.split(1000)])
    return float((preds == labels).float().mean())


def train_classifier(cfg: ClassifierConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_x, train_y = load_fashion_mnist("train", cfg.data_root)
    test_x, test_y = load_fashion_mnist("test", cfg.data_root)
    model = BenchClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = len(train_x) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"classifier epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True)
        for i in bar:
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = train_x[idx]
            shift = torch.randint(-2, 3, (2,), generator=gen).tolist()  # small translations: features that generalise
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    acc = accuracy(model, test_x, test_y)
    # Test-split feature statistics: the reference of the bench FD; the train split gives the floor.
    metric = frechet_metric(model.features)
    add_images(metric, test_x, real=True)
    add_images(metric, train_x, real=False)
    floor = float(metric.compute())
    with atomic_dir(cfg.out) as tmp:
        model.save(tmp, reference_stats(metric))
    return {"test_accuracy": acc, "fd_train_vs_test": floor, "seconds": time.time() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ClassifierConfig, args.config, args.overrides)
        result = train_classifier(cfg)
    except QdistillError as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
