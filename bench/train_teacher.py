"""Training a bench teacher on Fashion-MNIST (DDPMScheduler, EMA weights): the unconditional DDPM UNet2DModel
(`architecture: unet`) or a class-conditional DiTTransformer2DModel in pixel space (`architecture: dit`).
Resumable: a checkpoint (model, EMA, optimizer, RNG, data position) is written atomically every
`checkpoint_every` steps, and a run folder that holds one continues from it.

The UNet is saved as a DDPMPipeline folder. The DiT is saved as a model folder (config.json and weights) with
its scheduler_config.json beside it, the layout of qdistill's exports: no diffusers pipeline samples a pixel-space
class-conditional DiT (DiTPipeline decodes through a VAE), qdistill's samplers do."""
from __future__ import annotations

import argparse
import sys
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from diffusers.training_utils import EMAModel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from qdistill.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from qdistill.configs import load_config
from qdistill.denoisers import model_kwargs, noise_prediction
from qdistill.errors import QdistillError
from qdistill.files import atomic_dir

CHECKPOINT = "checkpoint.pt"


@dataclass
class TeacherConfig:
    out: str = "runs/teacher"  # checkpoints and TensorBoard logs
    export: str = "assets/teacher"  # the finished DDPM pipeline (EMA weights), save_pretrained
    init: str = ""  # optional model folder whose weights start a new run (to continue a finished one)
    data_root: str = str(DEFAULT_ROOT)
    steps: int = 10000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 300
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    architecture: str = "unet"  # unet: UNet2DModel (unconditional); dit: DiTTransformer2DModel (class-conditional)
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
    layers_per_block: int = 1
    # dit: patches of patch_size², num_layers blocks of num_attention_heads × attention_head_dim
    patch_size: int = 2
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self):
        if self.architecture not in ("unet", "dit"):
            raise ValueError(f"architecture must be 'unet' or 'dit', got {self.architecture!r}")
        if len(self.down_block_types) != len(self.block_out_channels) or len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError("block_out_channels, down_block_types and up_block_types must have the same length")


NUM_CLASSES = 10


def build_teacher(cfg: TeacherConfig):
    """(model, scheduler): 32×32 single-channel images, predicting the noise."""
    if cfg.architecture == "dit":
        model = DiTTransformer2DModel(sample_size=32, in_channels=1, out_channels=1, patch_size=cfg.patch_size,
                                      num_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                                      attention_head_dim=cfg.attention_head_dim, num_embeds_ada_norm=NUM_CLASSES)
    else:
        model = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=cfg.layers_per_block,
                            block_out_channels=tuple(cfg.block_out_channels), norm_num_groups=8, attention_head_dim=8,
                            down_block_types=tuple(cfg.down_block_types), up_block_types=tuple(cfg.up_block_types))
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    return model, scheduler


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The data position is a function of the step: epoch e is a fixed permutation of seed + e."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[pos * batch_size:(pos + 1) * batch_size]


def train_teacher(cfg: TeacherConfig) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist("train", cfg.data_root)
    torch.manual_seed(cfg.seed)
    unet, scheduler = build_teacher(cfg)
    if cfg.init:
        from qdistill.data.model_folder import load_denoiser

        start = load_denoiser(cfg.init)
        public = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        if type(start) is not type(unet) or public(start.config) != public(unet.config):
            raise ValueError(f"init={cfg.init}: its model config differs from this run's (block_out_channels, ...)")
        unet.load_state_dict(start.state_dict())
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_000)
    step = 0
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["generator"])
        if "torch_rng" in state:  # the global RNG draws DiT's label dropout
            torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        print(f"[teacher] resumed from {ckpt} at step {step}")

    writer = SummaryWriter(str(out / "tb"), purge_step=step)
    unet.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="teacher", dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < cfg.steps:
        idx = _batch_indices(step, cfg.batch_size, len(images), cfg.seed)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), generator=gen)
        cond = {"class_labels": labels[idx]} if cfg.architecture == "dit" else {}  # DiT drops 10 % for guidance
        loss = F.mse_loss(noise_prediction(unet(**model_kwargs(unet, scheduler.add_noise(x0, noise, t), t), **cond)),
                          noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        step += 1
        seen += x0.shape[0]
        bar.update(1)
        if step % 25 == 0:
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
            writer.add_scalar("train/grad_norm", float(grad_norm), step)
            writer.add_scalar("train/samples_per_s", seen / (time.time() - t0), step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"model": unet.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                     "lr_scheduler": sched.state_dict(), "generator": gen.get_state(), "step": step,
                     "torch_rng": torch.get_rng_state()}
            tmp = ckpt.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, ckpt)
    bar.close()
    writer.close()

    ema.copy_to(unet.parameters())
    unet.eval()
    with atomic_dir(cfg.export) as tmp:
        if cfg.architecture == "dit":  # a model folder with its scheduler beside it
            unet.save_pretrained(tmp)
            scheduler.save_pretrained(tmp)
        else:
            DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
    return Path(cfg.export)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TeacherConfig, args.config, args.overrides)
        path = train_teacher(cfg)
    except QdistillError as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    print(f"[teacher] saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
