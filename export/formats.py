"""The two folder formats qdistill writes, side by side, each named and versioned.

    qdistill-quantized  a quantized model's full float state (weights, quantizer tables, dilation vectors):
                        what `train` and `quantize` write to RUN/quantized and `export` reads
                        (export/quantized.py; load with `qdistill.export.load_quantized`)
    qdistill-export     packed integer weights and everything that runs them (export/packed.py; load with
                        `qdistill.export.load_exported`)

Both keep the base model's diffusers config.json, with a `quantization_config` entry added: plain diffusers
`from_pretrained` on either folder then stops at once with an error that names qdistill's loader (its
"Unknown quantization type, got <quant_method>" carries the pointer), instead of loading random weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_text

QUANTIZED, QUANTIZED_VERSION = "qdistill-quantized", 1
# 2 added second weight copies (step weights), 3 group-wise weights and low-rank branches; each export is written
# at the oldest version that holds it
EXPORT, EXPORT_VERSION = "qdistill-export", 3
LOADERS = {QUANTIZED: "qdistill.export.load_quantized(folder)",
           EXPORT: "qdistill.export.load_exported(folder, mode='simulated' or 'integer')"}


def marker(fmt: str, version: int) -> dict:
    return {"quant_method": f"qdistill ({fmt} folder: load it with {LOADERS[fmt]}, not diffusers)",
            "format": fmt, "format_version": version}


def save_model_config(model, folder: Path, fmt: str, version: int) -> None:
    """The model's diffusers config.json in `folder`, marked as a qdistill folder of format `fmt`."""
    model.save_config(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = marker(fmt, version)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_model(cls, folder: Path, device=None, dtype=None):
    """A fresh `cls` from the folder's config.json, the qdistill marker left out, on `device` in `dtype` (None:
    diffusers' defaults, CPU and float32). Its weights are left uninitialised: callers load a full state."""
    from diffusers.models.modeling_utils import no_init_weights

    config = dict(cls.load_config(folder))
    config.pop("quantization_config", None)
    with no_init_weights():  # every weight is replaced by the state the caller loads: no random init to throw away
        model = cls.from_config(config)
    moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return model.to(**moves) if moves else model
