"""Saving and loading quantized model state. Every write is atomic: files are written into a temporary
sibling and renamed into place, so an interrupted write never leaves a half-written result behind and
never destroys the previous one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..quantizers import QuantConfig, quantize_

STATE_FILE = "quantized_state.safetensors"
META_FILE = "quant_config.json"


class CheckpointError(ValueError):
    """A saved state is missing, truncated or does not fit; the message names the file."""


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_quantized(model, out_dir: str | Path, **metadata) -> Path:
    """Write the quantized model's full state (float weights, quantizer tables, dilation vectors), its
    quant config and its diffusers config to `out_dir`."""
    import qdistill

    config: QuantConfig = model.qdistill_config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"qdistill_version": qdistill.__version__, "model_class": type(model).__name__,
            "quant_config": config.to_dict(), **metadata}
    with atomic_dir(out_dir) as tmp:
        model.save_config(tmp)
        save_file(state, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def load_quantized(path: str | Path):
    """Rebuild a model saved by `save_quantized`: same diffusers class, quantized, state loaded."""
    path = Path(path)
    for name in (META_FILE, STATE_FILE, "config.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"quantized model folder {path} lacks {name}")
    try:
        meta = json.loads((path / META_FILE).read_text())
        config = QuantConfig(**meta["quant_config"])
        cls = getattr(diffusers, meta["model_class"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path / META_FILE} is not a valid quant config: {e}") from None
    try:
        state = load_file(str(path / STATE_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / STATE_FILE} is corrupted or truncated: {e}") from None
    model = cls.from_config(cls.load_config(path))
    quantize_(model, config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path / STATE_FILE} does not fit a {cls.__name__} quantized with {META_FILE}: "
                              f"{str(e).splitlines()[0]}") from None
    return model.eval()
