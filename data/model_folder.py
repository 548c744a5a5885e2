"""Load a user's diffusers model from a local folder: a pipeline folder (model_index.json with a `unet`
and a `scheduler`) or a bare model folder (config.json). Real `from_pretrained`, nothing downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import diffusers

from ..errors import ModelFolderError  # noqa: F401 (raised here; defined with the other user-facing errors)
from ..files import sha256_tree, shipped


def _class_from_config(config_file: Path):
    try:
        name = json.loads(config_file.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelFolderError(f"{config_file} is not a diffusers config ({e.__class__.__name__}: {e})") from None
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelFolderError(f"{config_file}: class {name!r} is not a diffusers class")
    return cls


def resolve(path: str | Path) -> tuple[Path, Path | None]:
    """(unet folder, scheduler folder or None) of a model path (`bench/teacher`: the shipped bench model)."""
    path = shipped(path)
    if not path.is_dir():
        raise ModelFolderError(f"model folder not found: {path}")
    if (path / "model_index.json").is_file():
        unet, scheduler = path / "unet", path / "scheduler"
        if not (unet / "config.json").is_file():
            raise ModelFolderError(f"pipeline folder {path} has no unet/config.json")
        return unet, scheduler if (scheduler / "scheduler_config.json").is_file() else None
    if (path / "config.json").is_file():
        return path, None
    raise ModelFolderError(f"{path} is not a diffusers model folder (no model_index.json or config.json)")


def load_unet(path: str | Path):
    """The denoiser of a model folder, as the diffusers class its config names."""
    unet_dir, _ = resolve(path)
    return _class_from_config(unet_dir / "config.json").from_pretrained(unet_dir)


SCHEDULER_KINDS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm": "DPMSolverMultistepScheduler"}


def convert_scheduler(base, kind: str | None):
    """`base` as a `kind` ('ddim', 'ddpm', 'dpm') scheduler with the same trained noise schedule."""
    if kind is None:
        return base
    if kind not in SCHEDULER_KINDS:
        raise ModelFolderError(f"unknown scheduler kind {kind!r}; choose one of {sorted(SCHEDULER_KINDS)}")
    return getattr(diffusers, SCHEDULER_KINDS[kind]).from_config(base.config)


def scheduler_from_file(config_file: str | Path):
    """A scheduler from a scheduler_config.json (as copied into export folders)."""
    config_file = Path(config_file)
    return _class_from_config(config_file).from_config(json.loads(config_file.read_text()))


def load_scheduler(path: str | Path, kind: str | None = None):
    """The folder's scheduler (or a default DDPM schedule if it has none), converted to `kind`
    ('ddim', 'ddpm', 'dpm') when given, keeping the trained noise schedule."""
    _, sched_dir = resolve(path)
    if kind is not None and kind not in SCHEDULER_KINDS:
        raise ModelFolderError(f"unknown scheduler kind {kind!r}; choose one of {sorted(SCHEDULER_KINDS)}")
    if sched_dir is None:
        base = diffusers.DDPMScheduler()
    else:
        base = _class_from_config(sched_dir / "scheduler_config.json").from_pretrained(sched_dir)
    return convert_scheduler(base, kind)


def model_hash(path: str | Path) -> str:
    """sha256 over the unet folder's files (names and bytes): identifies the source model of a result."""
    return sha256_tree(resolve(path)[0])
