"""Load a user's diffusers model from a local folder: a pipeline folder (model_index.json with a `unet` or a
`transformer`, and a `scheduler`) or a bare model folder (config.json). Real `from_pretrained`, nothing
downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import diffusers

from ..errors import ModelFolderError  # noqa: F401 (raised here; defined with the other user-facing errors)
from ..files import sha256_tree, shipped
from .trajectories import is_flow_matching


DENOISER_FOLDERS = ("unet", "transformer")  # where pipelines keep their denoiser


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
    """(denoiser folder, scheduler folder or None) of a model path (`assets/teacher`: the shipped bench model)."""
    path = shipped(path)
    if not path.is_dir():
        raise ModelFolderError(f"model folder not found: {path}")
    if (path / "model_index.json").is_file():
        found = [path / name for name in DENOISER_FOLDERS if (path / name / "config.json").is_file()]
        if not found:
            raise ModelFolderError(f"pipeline folder {path} has no unet/config.json or transformer/config.json")
        scheduler = path / "scheduler"
        return found[0], scheduler if (scheduler / "scheduler_config.json").is_file() else None
    if (path / "config.json").is_file():  # a model folder; its scheduler may sit beside it (as in exports)
        return path, path if (path / "scheduler_config.json").is_file() else None
    raise ModelFolderError(f"{path} is not a diffusers model folder (no model_index.json or config.json)")


def load_denoiser(path: str | Path):
    """The denoiser of a model folder, as the diffusers class its config names."""
    unet_dir, _ = resolve(path)
    return _class_from_config(unet_dir / "config.json").from_pretrained(unet_dir)


def load_pipeline(path: str | Path):
    """The pipeline folder's diffusers pipeline; components it was saved without (model_index.json lists them as
    [null, null], e.g. SD3 without its T5 encoder) are passed as None, which from_pretrained needs told."""
    path = shipped(path)
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{path} is not a pipeline folder: {Path(path) / 'model_index.json'}: {e}") from None
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    return diffusers.DiffusionPipeline.from_pretrained(path, **absent)


SCHEDULER_KINDS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm": "DPMSolverMultistepScheduler"}


def convert_scheduler(base, kind: str | None):
    """`base` as a `kind` ('ddim', 'ddpm', 'dpm') scheduler with the same trained noise schedule; `kind` None or
    'own': `base` as it is (a flow-matching scheduler, SD3's or Flux's, is only ever used as it is)."""
    if kind in (None, "own"):
        return base
    if kind not in SCHEDULER_KINDS:
        raise ModelFolderError(f"unknown scheduler kind {kind!r}; choose one of {sorted(SCHEDULER_KINDS)} or 'own'")
    if is_flow_matching(base):
        raise ModelFolderError(f"{type(base).__name__} is a flow-matching scheduler: as a {kind} scheduler it would "
                               "sample another schedule (a linear-β one); set scheduler=own to sample with it")
    return getattr(diffusers, SCHEDULER_KINDS[kind]).from_config(base.config)


def scheduler_from_file(config_file: str | Path):
    """A scheduler from a scheduler_config.json (as copied into export folders)."""
    config_file = Path(config_file)
    return _class_from_config(config_file).from_config(json.loads(config_file.read_text()))


def load_scheduler(path: str | Path, kind: str | None = None):
    """The folder's scheduler (or a default DDPM schedule if it has none), converted to `kind`
    ('ddim', 'ddpm', 'dpm') when given, keeping the trained noise schedule ('own' or None: as it is)."""
    _, sched_dir = resolve(path)
    if kind not in (None, "own") and kind not in SCHEDULER_KINDS:
        raise ModelFolderError(f"unknown scheduler kind {kind!r}; choose one of {sorted(SCHEDULER_KINDS)} or 'own'")
    if sched_dir is None:
        base = diffusers.DDPMScheduler()
    else:
        base = _class_from_config(sched_dir / "scheduler_config.json").from_pretrained(sched_dir)
    return convert_scheduler(base, kind)


def model_hash(path: str | Path) -> str:
    """sha256 over the denoiser folder's files (names and bytes): identifies the source model of a result."""
    return sha256_tree(resolve(path)[0])
