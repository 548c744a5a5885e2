"""Build and save a small randomly initialised DDPM pipeline (UNet2DModel + DDPMScheduler).

    python scripts/build_demo_model.py --out runs/demo-model

A stand-in until the trained bench model ships: its samples are not images, but every stage of
qdistill runs on it exactly as on a trained model (it is loaded back with from_pretrained).
"""
import argparse

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(args.out)
    print(f"saved a random {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M-parameter UNet2DModel to {args.out}")


if __name__ == "__main__":
    main()
