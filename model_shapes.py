"""UNet configs of public diffusion models, for models built from random weights or on the meta device (no
download): the memory planner (trainer/memory_plan.py: `--model sd-1.5`), the GPU check and the scaling
benchmarks. The hyperparameters are those of the models' published unet/config.json files."""
from __future__ import annotations

# google/ddpm-cifar10-32: 35.7M parameters, self-attention at 16x16
DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# runwayml/stable-diffusion-v1-5 unet: 860M parameters, 64x64 latents
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# stabilityai/stable-diffusion-xl-base-1.0 unet: 2.6B parameters, 128x128 latents, pooled text embeddings and
# time ids through the "text_time" added conditioning
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))

SHAPES = {"ddpm-cifar10": ("UNet2DModel", DDPM_CIFAR10), "sd-1.5": ("UNet2DConditionModel", SD15),
          "sdxl": ("UNet2DConditionModel", SDXL)}
