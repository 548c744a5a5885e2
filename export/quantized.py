"""The saved quantized model (format `qdistill-quantized`, export/formats.py): the full float state of a
model prepared by quantize_ (weights, quantizer tables, dilation vectors), its quant config and its
diffusers config. `train` and `quantize` write it to RUN/quantized; `export` reads it. Written atomically."""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_dir
from ..quantizers import QuantConfig, quantize_
from ..version import __version__
from .formats import QUANTIZED, QUANTIZED_VERSION, build_model, save_model_config

STATE_FILE = "quantized_state.safetensors"
META_FILE = "quant_config.json"


def save_quantized(model, out_dir: str | Path, **metadata) -> Path:
    """Write the quantized model's full state, its quant config and its diffusers config to `out_dir`;
    `metadata` (recipe, source model and hash, run config) is recorded in quant_config.json."""
    config: QuantConfig = model.qdistill_config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": QUANTIZED, "format_version": QUANTIZED_VERSION, "qdistill_version": __version__,
            "model_class": type(model).__name__, "quant_config": config.to_dict(), **metadata}
    with atomic_dir(out_dir) as tmp:
        save_model_config(model, tmp, QUANTIZED, QUANTIZED_VERSION)
        save_file(state, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def read_quantized_meta(path: str | Path) -> dict:
    path = Path(path)
    for name in (META_FILE, STATE_FILE, "config.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"quantized model folder {path} lacks {name}")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / META_FILE} is not valid JSON: {e}") from None
    if meta.get("format", QUANTIZED) != QUANTIZED:  # folders of qdistill 0.1 carry no format name
        raise CheckpointError(f"{path / META_FILE} is not a saved quantized model (format {meta.get('format')!r})")
    if meta.get("format_version", 1) > QUANTIZED_VERSION:
        raise CheckpointError(f"{path} is quantized-model format {meta['format_version']}; this qdistill reads up to "
                              f"{QUANTIZED_VERSION}")
    return meta


def quantized_folder(run: str | Path) -> Path:
    """The quantized model of `run`: RUN/quantized when it holds one (a run folder), else RUN itself."""
    run = Path(run)
    qdir = run / "quantized" if (run / "quantized" / META_FILE).is_file() else run
    if not (qdir / META_FILE).is_file():
        raise CheckpointError(f"{run} holds no quantized model ({run / 'quantized' / META_FILE} not found)")
    return qdir


def load_quantized(path: str | Path, device=None, dtype=None):
    """Rebuild a model saved by `save_quantized`: same diffusers class, quantized, state loaded, on `device` in
    `dtype` (the quantizer state with it)."""
    path = Path(path)
    meta = read_quantized_meta(path)
    try:
        config = QuantConfig(**meta["quant_config"])
        cls = getattr(diffusers, meta["model_class"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / META_FILE} is not a valid quant config: {e}") from None
    try:
        state = load_file(str(path / STATE_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / STATE_FILE} is corrupted or truncated: {e}") from None
    model = build_model(cls, path, device, dtype)
    quantize_(model, config, init_weights=False)  # the state below replaces weights and ranges
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path / STATE_FILE} does not fit a {cls.__name__} quantized with {META_FILE}: "
                              f"{str(e).splitlines()[0]}") from None
    return model.eval()
