"""`qdistill eval` and its metrics: FD/FID code paths, the FP reference cache, ranks, text-conditional models."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DModel

from conftest import REPO
from qdistill.cli import main as qdistill
from qdistill.evaluation.classifier_fd import ConvFeatures
from qdistill.evaluation.frechet import frechet_distance
from qdistill.evaluation.inception import inception_metrics, load_feature_network
from qdistill.export import export_model
from qdistill.quantizers import QuantConfig, fit_ranges_, quantize_


def images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 32, 32, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    torch.manual_seed(0)
    features = ConvFeatures(width=8, num_features=16).eval()
    a = images(300, 1)
    same = frechet_distance(features, a, a)
    other_draw = frechet_distance(features, a, images(300, 2))
    shifted = frechet_distance(features, a, images(300, 2, shift=0.3))
    assert abs(same) < 1e-3 * shifted
    assert other_draw < shifted


class StandInInception(torch.nn.Module):
    """A small network with Inception's three outputs, built locally in place of a weights file."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.pool_fc = torch.nn.Linear(12, 32)
        self.logits_fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        spatial = torch.relu(self.conv(x.float() / 127.5 - 1))
        pool = torch.relu(self.pool_fc(spatial.mean(dim=(2, 3))))
        return {"pool": pool, "logits": self.logits_fc(pool), "spatial": spatial}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception.pt2"
    example = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(StandInInception().eval(), (example,), dynamic_shapes=({0: batch},)), str(path))
    return path


def test_inception_path_fid_sfid_is(inception_file):
    net = load_feature_network(inception_file)
    to_u8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    a, b, shifted = to_u8(images(200, 1)), to_u8(images(200, 2)), to_u8(images(200, 2, shift=0.4))
    same, other, far = inception_metrics(net, a, a), inception_metrics(net, b, a), inception_metrics(net, shifted, a)
    for key in ("fid", "sfid"):
        assert abs(same[key]) < 1e-3 * far[key], (key, same, far)
        assert other[key] < far[key], (key, other, far)
    assert 1.0 <= same["is"] <= 10.0
    with pytest.raises(ValueError, match="not a feature network"):
        bad = inception_file.parent / "bad.pt"
        bad.write_bytes(b"not a model")
        load_feature_network(bad)


@pytest.fixture(scope="module")
def bench_export(tmp_path_factory):
    """The bench teacher at W8A8, calibrated on a few timesteps, exported (with its scheduler)."""
    from qdistill.data.model_folder import load_scheduler

    fp = UNet2DModel.from_pretrained(REPO / "assets" / "teacher" / "unet").eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(4, 1, 32, 32, generator=g), "timestep": torch.full((4,), float(t))}
               for t in (999, 759, 519, 279, 39)]
    q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8)), batches)
    path = tmp_path_factory.mktemp("export") / "w8a8"
    export_model(q, path, recipe="test", scheduler_config=dict(load_scheduler(REPO / "assets" / "teacher").config))
    return path


EVAL_ARGS = ["num_samples=8", "steps=5", "batch_size=4", "fidelity_samples=2"]


def test_bf16_ptqd_measurement_and_eval_match_fp32(tmp_path):
    """precision=bf16 in export (PTQD's trajectories and measurements under autocast) and in eval (FP reference
    and simulated quantized sampling under autocast), against fp32, on the trained bench teacher at W8A8.
    Measured 2026-12-02 (8 seeds, 10 DDIM steps): k 0.007 apart at most (|k| up to 0.47), σ_q 2 % apart; PSNR
    34.0 vs 34.7 dB, noise-prediction MSE 6 % apart, FD 475.1 vs 475.8."""
    from qdistill.export import load_noise_correction, save_quantized
    from conftest import rel_err

    fp = UNet2DModel.from_pretrained(REPO / "assets" / "teacher" / "unet").eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(4, 1, 32, 32, generator=g), "timestep": torch.full((4,), float(t))}
               for t in (999, 759, 519, 279, 39)]
    q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8)), batches)
    save_quantized(q, tmp_path / "run" / "quantized", recipe="test", source_model=str(REPO / "assets" / "teacher"))
    got = {}
    for p in ("fp32", "bf16"):
        assert qdistill(["export", f"run={tmp_path / 'run'}", f"out={tmp_path / p}", "noise_correction=true",
                         "measure.num_samples=8", "measure.steps=10", "measure.batch_size=8", f"precision={p}"]) == 0
        assert qdistill(["eval", f"model={tmp_path / p}", f"reference={REPO / 'assets' / 'teacher'}", "mode=simulated",
                         f"precision={p}", "num_samples=8", "steps=10", "batch_size=8", "fidelity_samples=2",
                         f"out={tmp_path / p / 'eval'}", f"cache_dir={tmp_path / 'cache'}"]) == 0
        got[p] = load_noise_correction(tmp_path / p), json.loads((tmp_path / p / "eval" / "metrics.json").read_text())
    (nc32, m32), (nc16, m16) = got["fp32"], got["bf16"]
    assert m16["precision"] == "bf16" and m32["precision"] == "fp32"
    assert (nc16.k - nc32.k).abs().max() < 0.03 and rel_err(nc16.sigma, nc32.sigma) < 0.1
    assert abs(m16["psnr_db"] - m32["psnr_db"]) < 2.0
    assert abs(m16["noise_pred_mse_mean"] / m32["noise_pred_mse_mean"] - 1) < 0.25
    assert abs(m16["fd"] / m32["fd"] - 1) < 0.05


def test_eval_writes_metrics_grid_tensorboard_and_reuses_the_fp_reference(bench_export, inception_file, tmp_path,
                                                                        capsys):
    args = ["eval", f"model={bench_export}", f"reference={REPO / 'assets' / 'teacher'}", f"cache_dir={tmp_path / 'cache'}",
            f"classifier={REPO / 'assets' / 'classifier'}", f"inception={inception_file}", *EVAL_ARGS]
    assert qdistill([*args, f"out={tmp_path / 'a'}"]) == 0
    first = capsys.readouterr().out
    assert "FP reference cached" in first and "metric" in first  # the table
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in ("fd", "fd_fp", "delta_fd", "psnr_db", "ssim", "noise_pred_mse_mean", "fid_vs_fp", "sfid_vs_fp", "is"):
        assert isinstance(metrics[key], float), key
    assert metrics["delta_fd"] == pytest.approx(metrics["fd"] - metrics["fd_fp"])
    assert len(metrics["noise_pred_mse_per_step"]) == 5 and metrics["integer_layers"] > 50
    assert 15 < metrics["psnr_db"] < 60 and 0.5 < metrics["ssim"] <= 1.0
    assert (tmp_path / "a" / "samples.png").stat().st_size > 0
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "a" / "tb").iterdir())

    assert qdistill([*args, f"out={tmp_path / 'b'}"]) == 0
    assert "FP reference from cache" in capsys.readouterr().out
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    for key in ("fd", "fd_fp", "psnr_db", "ssim", "noise_pred_mse_mean", "fid_vs_fp"):
        assert again[key] == metrics[key], key


@pytest.mark.slow
def test_eval_two_ranks_equals_one_rank(bench_export, tmp_path):
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    common = ["-m", "qdistill", "eval", f"model={bench_export}", "reference=assets/teacher", *EVAL_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for n in (1, 2):
        subprocess.run([*base, f"--nproc_per_node={n}", *common, f"out={tmp_path / f'r{n}'}",
                        f"cache_dir={tmp_path / f'cache{n}'}"], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=600)
    one, two = (json.loads((tmp_path / f"r{n}" / "metrics.json").read_text()) for n in (1, 2))
    assert two["world_size"] == 2
    for key in ("fd", "fd_fp", "delta_fd", "psnr_db", "ssim", "noise_pred_mse_mean", "min_class_share"):
        assert one[key] == two[key], key


def test_eval_refuses_a_non_export(tmp_path, capsys):
    assert qdistill(["eval", f"model={REPO / 'assets' / 'teacher'}", f"out={tmp_path}"]) == 2
    assert "lacks quant_config.json" in capsys.readouterr().err


def build_tiny_clip(path, tokenizer_dir):
    """A CLIP model folder from random weights with the tiny SD pipeline's tokenizer (nothing downloaded)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                           num_hidden_layers=1), projection_dim=8)
    CLIPModel(config).eval().save_pretrained(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=tokenizer)
    processor.save_pretrained(path)
    return path


def test_eval_of_a_text_conditional_export_with_clip_score(tiny_sd_dir, tmp_path):
    """A Stable-Diffusion-shaped pipeline: the quantized UNet samples inside the reference's own pipeline
    (text encoder, VAE), and eval reports the CLIP score beside the fidelity metrics."""
    from diffusers import UNet2DConditionModel

    from qdistill.data.model_folder import load_scheduler

    fp = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(4, 4, 8, 8, generator=g), "timestep": torch.full((4,), float(t)),
                "encoder_hidden_states": torch.randn(4, 16, 24, generator=g)} for t in (999, 500, 1)]
    q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8)), batches)
    export_model(q, tmp_path / "export", recipe="test", scheduler_config=dict(load_scheduler(tiny_sd_dir).config))
    clip = build_tiny_clip(tmp_path / "clip", tiny_sd_dir / "tokenizer")
    (tmp_path / "prompts.txt").write_text("a photo of a red shoe\na blue bag\n")
    args = ["eval", f"model={tmp_path / 'export'}", f"reference={tiny_sd_dir}", f"prompts={tmp_path / 'prompts.txt'}",
            f"clip={clip}", f"out={tmp_path / 'eval'}", f"cache_dir={tmp_path / 'cache'}", "guidance_scale=3.0",
            *EVAL_ARGS]
    assert qdistill(args) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "fd" not in metrics  # 3×16×16 images: the bench classifier does not apply
    assert metrics["clip_score"] > 0 and metrics["clip_score_fp"] > 0
    assert 10 < metrics["psnr_db"] < 80 and len(metrics["noise_pred_mse_per_step"]) == 5


def test_eval_of_a_class_conditional_model_samples_balanced_labels(tmp_path):
    """A class-conditional UNet2DModel (as calibrate and train accept): eval samples it with one label per seed,
    balanced over the classes (seed % num_classes, the calibration rule), for FP and quantized alike."""
    from diffusers import DDPMScheduler

    from qdistill.data.model_folder import load_scheduler
    from qdistill.evaluation.sampling import sample_batch

    torch.manual_seed(0)
    fp = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                     norm_num_groups=8, num_class_embeds=3, down_block_types=("DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    fp.save_pretrained(tmp_path / "fp")
    seen = []
    handle = fp.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].tolist()), with_kwargs=True)
    sample_batch(fp, load_scheduler(tmp_path / "fp", "ddim"), [10, 11, 12, 13], 2)
    handle.remove()
    assert seen == [[1, 2, 0, 1]] * 2

    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(4, 1, 8, 8, generator=g), "timestep": torch.full((4,), float(t)),
                "class_labels": torch.tensor([0, 1, 2, 0])} for t in (999, 500, 1)]
    q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8)), batches)
    export_model(q, tmp_path / "export", recipe="test",
                 scheduler_config={"_class_name": "DDPMScheduler", **DDPMScheduler().config})
    assert qdistill(["eval", f"model={tmp_path / 'export'}", f"reference={tmp_path / 'fp'}", "mode=simulated",
                     f"out={tmp_path / 'eval'}", f"cache_dir={tmp_path / 'cache'}", *EVAL_ARGS]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 10 < metrics["psnr_db"] < 80 and len(metrics["noise_pred_mse_per_step"]) == 5
