"""Small diffusers models built from random weights, and helpers shared by the tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["-m", "qdistill", "train"]  # how a launcher runs `qdistill train`
STATE = Path("quantized") / "quantized_state.safetensors"  # a run's trained model, under its `out` folder

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


# Tiny diffusion transformers of every family qdistill handles (DiT, PixArt, SD3, Flux), random weights.
TRANSFORMER_CONFIGS = {
    "dit": ("DiTTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)),
    "pixart": ("PixArtTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                cross_attention_dim=16, caption_channels=12)),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                          caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                          pos_embed_max_size=8)),
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                            pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(2, 2, 4))),
}


def build_transformer(family: str, seed: int = 0):
    import diffusers

    cls, config = TRANSFORMER_CONFIGS[family]
    torch.manual_seed(seed)
    return getattr(diffusers, cls)(**config).eval()


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


@pytest.fixture
def demo_pipeline_dir(tmp_path):
    """A small DDPM pipeline saved with save_pretrained, as a user's model folder."""
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path / "model"
    DDPMPipeline(unet=build_unet("attn-lpb1"), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def _tiny_tokenizer(folder: Path, max_length: int = 16):
    """A CLIP tokenizer over a hand-made vocabulary: a few words, each rebuilt from its characters by merges."""
    import json

    from transformers import CLIPTokenizer

    words = ["a", "photo", "of", "red", "blue", "shoe", "bag", "dress", "coat", "shirt"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    merges = ["#version: 0.2"]
    for w in words:  # merges that rebuild each word from its characters
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _tiny_text_config(vocab_size: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=24, intermediate_size=32, num_attention_heads=2,
                          num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **extra)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[8, 8],
                         latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16)


def _like_trained(unet):
    with torch.no_grad():  # like trained weights: no norm bias left at exactly zero (see tiny_unet)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def build_tiny_sd_pipeline(path):
    """A Stable-Diffusion-shaped pipeline from random weights (UNet2DConditionModel, a tiny CLIP text model
    with a hand-made tokenizer vocabulary, AutoencoderKL), saved with save_pretrained. Nothing downloaded."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(Path(path) / "_tokenizer_src")
    text_encoder = CLIPTextModel(_tiny_text_config(len(tokenizer))).eval()
    vae = _tiny_vae()
    unet = _like_trained(UNet2DConditionModel(**{**UNET_COND_CONFIGS["xattn-lpb1"], "sample_size": 8}))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    shutil.rmtree(Path(path) / "_tokenizer_src")
    return Path(path)


def build_tiny_sdxl_pipeline(path):
    """An SDXL-shaped pipeline from random weights: two CLIP text encoders (the second with a projection, whose
    pooled output the UNet takes with the time_ids through addition_embed_type "text_time"), their
    hidden states concatenated as the cross-attention context. Saved with save_pretrained; nothing downloaded."""
    import shutil

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(Path(path) / "_tokenizer_src")
    text_encoder = CLIPTextModel(_tiny_text_config(len(tokenizer))).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(len(tokenizer), projection_dim=16)).eval()
    unet = _like_trained(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=48, attention_head_dim=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")))
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(path)
    shutil.rmtree(Path(path) / "_tokenizer_src")
    return Path(path)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe")


# Block-wise distillation runs (`qdistill train` in a subprocess), shared by test_distill and test_adaround.
def tiny_unet():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    # like a trained model: no parameter sits at exactly zero or one (Adam's first steps are sign-like, and a
    # bias whose gradient is near zero would move by ±lr on float noise alone)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def make_tiny_bench(root, num_samples: int, batch_size: int):
    """The tiny DDPM saved under root/model and its trajectories under root/traj (5 of 10 DDIM steps kept,
    one shard per `batch_size` seeds)."""
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(root / "model")
    from qdistill.cli import main as qdistill

    rc = qdistill(["calibrate", "--config", "calibrate", f"model={root / 'model'}", f"out={root / 'traj'}",
                   f"num_samples={num_samples}", f"batch_size={batch_size}", "steps=10", "every=2"])
    assert rc == 0
    return root


def launch(args: list[str], nproc: int = 1, extra_torchrun: tuple = (), wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1 and not extra_torchrun:
        cmd = [sys.executable, *TRAIN, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *extra_torchrun, *TRAIN, *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def train_in_process(args: list[str]) -> tuple[int, str]:
    """`qdistill train` with `args` in this process, as one rank (what `launch(args)` runs, without a
    process start and its imports: for tests whose subject is not the launcher). (exit code, output)."""
    import contextlib
    import io

    from qdistill.cli import main as qdistill

    threads, out = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = qdistill(["train", *args])
    finally:
        torch.set_num_threads(threads)  # `threads=` sets the process's thread count
    return rc, out.getvalue()


def launch_srun(args: list[str], ntasks: int) -> tuple[int, str]:
    """`qdistill train` as `srun --ntasks=N python -m qdistill train ...` starts it on one node: N plain
    processes that know their rank only from SLURM_* variables (no torchrun, no RANK)."""
    from qdistill.distributed_env import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", SLURM_JOB_ID=str(free_port()),
               SLURM_STEP_ID="0", SLURM_NTASKS=str(ntasks), SLURM_STEP_NUM_TASKS=str(ntasks),
               SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost")
    procs = [subprocess.Popen([sys.executable, *TRAIN, *args], env={**env, "SLURM_PROCID": str(i),
                                                                    "SLURM_LOCALID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
             for i in range(ntasks)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    return max(p.returncode for p in procs), "\n".join(logs)


def trained_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / STATE))


def assert_states_close(a: dict, b: dict, rtol: float) -> float:
    """Every tensor within `rtol` of the other in relative norm: ||a - b|| / ||a|| (for runs that do the same
    arithmetic, such as resumed vs uninterrupted)."""
    assert a.keys() == b.keys()
    worst, worst_key = 0.0, None
    for k in a:
        diff = (a[k].double() - b[k].double()).norm().item() / max(a[k].double().norm().item(), 1e-12)
        if diff > worst:
            worst, worst_key = diff, k
    assert worst <= rtol, f"largest relative difference {worst:.3e} > {rtol} ({worst_key})"
    return worst
