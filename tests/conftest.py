"""Small diffusers models built from random weights, and helpers shared by the tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

REPO = Path(__file__).resolve().parents[1]

# Differently shaped UNets: attention or not, cross-attention, layers_per_block 1 and 2.
UNET2D_CONFIGS = {
    "plain-lpb2": dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=2,
                       block_out_channels=(16, 32), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
    "attn-lpb1": dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                      block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=8,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}
UNET_COND_CONFIGS = {
    "xattn-lpb1": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "xattn-lpb2": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}


def build_unet(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name in UNET2D_CONFIGS:
        return UNet2DModel(**UNET2D_CONFIGS[name]).eval()
    return UNet2DConditionModel(**UNET_COND_CONFIGS[name]).eval()


def example_inputs(unet, batch: int = 4, seed: int = 1, timesteps=None) -> dict:
    """One batch of model inputs; conditional models also get encoder_hidden_states."""
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    t = torch.tensor(timesteps, dtype=torch.float32) if timesteps is not None else torch.randint(0, 1000, (batch,), generator=g).float()
    kw = {"sample": torch.randn(batch, c, s, s, generator=g), "timestep": t}
    if isinstance(unet, UNet2DConditionModel):
        kw["encoder_hidden_states"] = torch.randn(batch, 5, unet.config.cross_attention_dim, generator=g)
    return kw


def calibration_batches(unet, timesteps=(999, 750, 500, 250, 0), batches: int = 2, batch: int = 4):
    """Inputs at several timesteps, each batch mixing them."""
    out = []
    for i in range(batches):
        ts = [timesteps[(i * batch + j) % len(timesteps)] for j in range(batch)]
        out.append(example_inputs(unet, batch, seed=100 + i, timesteps=ts))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def load_script(name: str):
    """Import scripts/NAME.py as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_pipeline_dir(tmp_path):
    """A small DDPM pipeline saved with save_pretrained, as a user's model folder."""
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path / "model"
    DDPMPipeline(unet=build_unet("attn-lpb1"), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def build_tiny_sd_pipeline(path):
    """A Stable-Diffusion-shaped pipeline from random weights (UNet2DConditionModel, a tiny CLIP text model
    with a hand-made tokenizer vocabulary, AutoencoderKL), saved with save_pretrained. Nothing downloaded."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    words = ["a", "photo", "of", "red", "blue", "shoe", "bag", "dress", "coat", "shirt"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok_dir = Path(path) / "_tokenizer_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    merges = ["#version: 0.2"]
    for w in words:  # merges that rebuild each word from its characters
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=32,
                                                num_attention_heads=2, num_hidden_layers=2,
                                                max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[8, 8],
                        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16)
    unet = UNet2DConditionModel(**{**UNET_COND_CONFIGS["xattn-lpb1"], "sample_size": 8})
    with torch.no_grad():  # like trained weights: no norm bias left at exactly zero (see test_distill.tiny_unet)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    import shutil

    shutil.rmtree(tok_dir)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe")
