"""Per-rank memory and compute of a `qdistill train` run, worked out on the meta device (no weights needed).

    python scripts/plan.py --model FOLDER_OR_CONFIG_JSON_OR_SHAPE [--config dilatequant] [--rows 5120]
                           [--ranks 1,8] [key=value ...]

--model: a model folder (unet/config.json), a diffusers config.json, or a shape name (sd-1.5, sdxl,
ddpm-cifar10: qdistill.model_shapes). key=value overrides are `qdistill train`'s (distill.batch_size=...,
precision=bf16, deepspeed=zero1.json, ...). Prints one Markdown table, a column per rank count.
"""
import sys

from qdistill.trainer.memory_plan import main

sys.exit(main())
