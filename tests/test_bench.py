"""The bench: dataset loader, teacher training (resume), FD, and the shipped teacher and classifier."""
import gzip
import struct

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline

from conftest import REPO
from qdistill.configs import load_config
from qdistill.data.fashion_mnist import DEFAULT_ROOT, DatasetMissingError, load_fashion_mnist
from qdistill.evaluation.classifier_fd import BenchClassifier, load_test_stats
from qdistill.evaluation.frechet import frechet_distance
from qdistill.bench.train_classifier import accuracy
from qdistill.bench.train_teacher import TeacherConfig, train_teacher

HAVE_DATA = (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")


def write_idx(root, split, images, labels):
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}[split]
    with gzip.open(root / names[0], "wb") as fh:
        fh.write(struct.pack(">IIII", 0x803, *images.shape) + images.tobytes())
    with gzip.open(root / names[1], "wb") as fh:
        fh.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 16)):
        write_idx(tmp_path, split, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, n, dtype=np.uint8))
    return tmp_path


def test_loader_pads_and_scales(fake_fashion_mnist):
    images, labels = load_fashion_mnist("train", fake_fashion_mnist)
    assert images.shape == (64, 1, 32, 32) and labels.shape == (64,)
    assert images.min() >= -1 and images.max() <= 1
    assert (images[:, :, :2] == -1).all() and (images[:, :, :, -2:] == -1).all()  # padding is background


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def tiny_teacher(root, out, steps, export):
    return load_config(TeacherConfig, None, [
        f"data_root={root}", f"out={out}", f"export={export}", f"steps={steps}", "batch_size=8",
        "checkpoint_every=2", "block_out_channels=[8, 16]", "down_block_types=[DownBlock2D, DownBlock2D]",
        "up_block_types=[UpBlock2D, UpBlock2D]", "warmup_steps=2"])


def test_teacher_resume_equals_uninterrupted(fake_fashion_mnist, tmp_path):
    train_teacher(tiny_teacher(fake_fashion_mnist, tmp_path / "a", 6, tmp_path / "a_export"))
    train_teacher(tiny_teacher(fake_fashion_mnist, tmp_path / "b", 4, tmp_path / "b_export"))  # "interrupted"
    train_teacher(tiny_teacher(fake_fashion_mnist, tmp_path / "b", 6, tmp_path / "b_export"))  # resumed
    a = DDPMPipeline.from_pretrained(tmp_path / "a_export").unet.state_dict()
    b = DDPMPipeline.from_pretrained(tmp_path / "b_export").unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list((tmp_path / "a" / "tb").glob("events.out.tfevents.*"))


def test_dit_teacher_resume_equals_uninterrupted_and_loads_with_its_scheduler(fake_fashion_mnist, tmp_path):
    from qdistill.data.model_folder import load_denoiser, load_scheduler

    dit = ["architecture=dit", "patch_size=8", "num_layers=1", "num_attention_heads=2", "attention_head_dim=8"]
    for run, steps in (("a", 6), ("b", 4), ("b", 6)):  # b: "interrupted" after 4 steps, then resumed
        cfg = load_config(TeacherConfig, None, [f"data_root={fake_fashion_mnist}", f"out={tmp_path / run}",
                                                f"export={tmp_path / (run + '_export')}", f"steps={steps}",
                                                "batch_size=8", "checkpoint_every=2", "warmup_steps=2", *dit])
        train_teacher(cfg)
    a, b = (load_denoiser(tmp_path / f"{run}_export") for run in ("a", "b"))
    assert type(a).__name__ == "DiTTransformer2DModel" and a.config.num_embeds_ada_norm == 10
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert load_scheduler(tmp_path / "a_export").config.beta_schedule == "squaredcos_cap_v2"  # beside the model


def test_frechet_distance_orders_distributions():
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))
    extractor.num_features = 8
    x = torch.randn(400, 1, 8, 8)
    same = frechet_distance(extractor, x, x)
    shifted = frechet_distance(extractor, x + 0.5, x)
    assert abs(same) < 1e-3 and shifted > 0.1


def test_shipped_teacher_loads_and_samples():
    pipe = DDPMPipeline.from_pretrained(REPO / "assets" / "teacher")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=4, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (4, 32, 32, 1) and np.isfinite(images).all() and images.std() > 0.1


@needs_data
def test_shipped_classifier_accuracy_and_stats():
    classifier = BenchClassifier.load(REPO / "assets" / "classifier")
    test_x, test_y = load_fashion_mnist("test")
    assert accuracy(classifier, test_x, test_y) >= 0.90
    # the stored test statistics are those of the test split: FD(test, stored) ≈ 0
    assert abs(frechet_distance(classifier.features, test_x, load_test_stats(REPO / "assets" / "classifier"))) < 1e-2
