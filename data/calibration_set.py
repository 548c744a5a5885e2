"""Calibration trajectories on disk: `datasets` shards plus a manifest (docs/design.md §3.1).

Layout of a trajectory folder:

    manifest.json          source model hash, scheduler config, seeds, selection, shapes, dtype, shards
    shards/shard-00000/    one `datasets` dataset per fixed batch of seeds (save_to_disk)
    shards/shard-00001/ …

Batch i of the global seed list becomes shard i and is recorded by rank i % N, so the folder is the same
whatever N is. Shards are written atomically (temporary folder, then rename); the manifest is written
last, by rank 0, so a folder without one is an unfinished run, and running again resumes it: shards
already on disk are kept.

Rows are one UNet input each: sample_id (the seed), step, timestep, x_t, the FP noise prediction (the
guided one under classifier-free guidance), and the conditioning when the model takes one: class_label,
or encoder_hidden_states plus negative_encoder_hidden_states for guidance; SDXL-class UNets also text_embeds
(pooled), negative_text_embeds and time_ids.

Format 2 (this version) lists the row columns in the manifest ("columns"); format 1 folders, which predate
the SDXL columns, still load.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import torch

from ..denoisers import is_flux, latent_name, model_kwargs
from ..devices import cast_inputs
from ..errors import CalibrationSetError  # noqa: F401 (raised here; defined with the other user-facing errors)
from .trajectories import Conditioning, StepRecord

MANIFEST = "manifest.json"
SHARDS = "shards"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
# the conditioning columns a row may carry, by the Conditioning field they hold
COND_COLUMNS = {"class_label": "class_labels", "encoder_hidden_states": "encoder_hidden_states",
                "negative_encoder_hidden_states": "negative_encoder_hidden_states", "text_embeds": "text_embeds",
                "negative_text_embeds": "negative_text_embeds", "time_ids": "time_ids",
                "pooled_projections": "pooled_projections", "negative_pooled_projections": "negative_pooled_projections",
                "guidance": "guidance", "encoder_attention_mask": "encoder_attention_mask",
                "negative_encoder_attention_mask": "negative_encoder_attention_mask"}



def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _features(example: dict[str, np.ndarray]) -> datasets.Features:
    def array(a):
        cls = {1: datasets.Sequence, 2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D}[a.ndim]
        return datasets.Sequence(datasets.Value("float32"), length=a.shape[0]) if a.ndim == 1 else \
            cls(shape=a.shape, dtype="float32")

    feats = {"sample_id": datasets.Value("int64"), "step": datasets.Value("int32"),
             "timestep": datasets.Value("float32")}
    for key, value in example.items():
        if key in feats:
            continue
        feats[key] = datasets.Value("int64") if key == "class_label" else \
            datasets.Value("float32") if np.ndim(value) == 0 else array(np.asarray(value))
    return datasets.Features(feats)


def rows_from_records(records: list[StepRecord], keep: dict[int, set[int]] | None,
                      cond_rows: dict[int, Conditioning] | None = None) -> dict[str, list]:
    """Flatten batched records into rows; `keep[seed]` limits the steps kept per sample (None: all)."""
    rows: dict[str, list] = {"sample_id": [], "step": [], "timestep": [], "x_t": [], "noise_pred": []}
    for r in records:
        for j, seed in enumerate(r.seeds):
            if keep is not None and r.step not in keep[seed]:
                continue
            rows["sample_id"].append(seed)
            rows["step"].append(r.step)
            rows["timestep"].append(float(r.timestep[j]))
            rows["x_t"].append(r.sample[j].float().cpu().numpy())
            rows["noise_pred"].append(r.noise_pred[j].float().cpu().numpy())
            cond = cond_rows.get(seed) if cond_rows else None
            if cond is not None:
                for key, attr in COND_COLUMNS.items():
                    value = getattr(cond, attr)
                    if value is not None:
                        value = int(value) if key == "class_label" else float(value) if value.dim() == 0 else \
                            value.float().cpu().numpy()
                        rows.setdefault(key, []).append(value)
    return rows


def write_shard(root: str | Path, index: int, rows: dict[str, list]) -> Path:
    """Save one shard atomically."""
    shards = Path(root) / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    final = shards / shard_name(index)
    tmp = shards / f".{shard_name(index)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    example = {k: v[0] for k, v in rows.items()}
    datasets.Dataset.from_dict(rows, features=_features(example)).save_to_disk(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _shard_files(shard: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(shard.glob("*.arrow"))}


def write_manifest(root: str | Path, num_shards: int, info: dict) -> dict:
    """Rank 0, after every rank finished: check all shards exist, then write the manifest (last, atomically)."""
    root = Path(root)
    shards = []
    for i in range(num_shards):
        path = root / SHARDS / shard_name(i)
        if not path.is_dir():
            raise CalibrationSetError(f"shard {path} was not written (a rank failed?); run again to resume")
        rows = len(datasets.load_from_disk(str(path)))
        shards.append({"name": shard_name(i), "rows": rows, "files": _shard_files(path)})
    columns = list(datasets.load_from_disk(str(root / SHARDS / shard_name(0))).column_names) if num_shards else []
    manifest = {"format": FORMAT_VERSION, **info, "columns": columns, "num_rows": sum(s["rows"] for s in shards),
                "shards": shards}
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CalibrationSetError(f"{path} not found: not a trajectory folder, or its recording did not finish")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise CalibrationSetError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise CalibrationSetError(f"{path}: unsupported format {manifest.get('format')!r}")
    return manifest


def check_model(manifest: dict, model_hash: str, root: str | Path) -> None:
    if manifest["source_model_hash"] != model_hash:
        raise CalibrationSetError(
            f"{Path(root) / MANIFEST} was recorded from model {manifest['source_model']} "
            f"(hash {manifest['source_model_hash'][:12]}), not from the given model (hash {model_hash[:12]})")


def load_shards(root: str | Path, rank: int = 0, world_size: int = 1, model_hash: str | None = None
                ) -> datasets.Dataset:
    """The shards recorded by `rank` of `world_size` (shard i by rank i % world_size), verified against the
    manifest, as one torch-formatted dataset."""
    count = len(read_manifest(root)["shards"])
    if count < world_size:
        raise CalibrationSetError(f"{root} has {count} shards, fewer than the {world_size} ranks")
    return datasets.concatenate_datasets(load_shard_list(root, model_hash, range(rank, count, world_size))
                                         ).with_format("torch")


def load_shard_list(root: str | Path, model_hash: str | None = None, indices=None) -> list[datasets.Dataset]:
    """The shards numbered `indices` (all when None), each its own torch-formatted dataset verified against
    the manifest, in the order given."""
    root = Path(root)
    manifest = read_manifest(root)
    if model_hash is not None:
        check_model(manifest, model_hash, root)
    listed = manifest["shards"]
    indices = range(len(listed)) if indices is None else indices
    parts = []
    for i in indices:
        shard = listed[i]
        path = root / SHARDS / shard["name"]
        if not path.is_dir():
            raise CalibrationSetError(f"shard {path} listed in the manifest is missing")
        if _shard_files(path) != shard["files"]:
            raise CalibrationSetError(f"shard {path} does not match the manifest (truncated or rewritten): "
                                      f"files {_shard_files(path)} != {shard['files']}")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # arrow raises a variety of errors on a damaged file
            raise CalibrationSetError(f"shard {path} cannot be read: {e}") from None
        if len(ds) != shard["rows"]:
            raise CalibrationSetError(f"shard {path} has {len(ds)} rows, the manifest says {shard['rows']}")
        parts.append(ds.with_format("torch"))
    return parts


def to_model_inputs(batch: dict[str, torch.Tensor], model=None) -> dict[str, torch.Tensor]:
    """A batch of rows → kwargs for `model` (a UNet when None): its latent input by its own name, guidance rows as
    a 2B batch [uncond, cond], and whatever conditioning its family takes (denoisers.py)."""

    guided = "negative_encoder_hidden_states" in batch
    both = lambda v: torch.cat([v, v]) if guided else v  # noqa: E731 (the halves share x_t, t, guidance)
    pair = lambda key: torch.cat([batch["negative_" + key], batch[key]]) if guided else batch[key]  # noqa: E731
    latent = latent_name(model) if model is not None else "sample"
    kw = {latent: both(batch["x_t"]), "timestep": both(batch["timestep"])}
    if "class_label" in batch:
        kw["class_labels"] = batch["class_label"]
    for key in ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections"):
        if key in batch:
            kw[key] = pair(key)
    if "guidance" in batch:
        kw["guidance"] = both(batch["guidance"])
    if model is not None and is_flux(model):  # the positions of its packed latent and text tokens
        text = kw["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in kw else 0
        kw.update({k: v for k, v in model_kwargs(model, kw[latent], kw["timestep"], text).items()
                   if k in ("img_ids", "txt_ids")})
    if "text_embeds" in batch:  # SDXL-class: the guidance halves share time_ids, as in diffusers' pipeline
        guided = "negative_text_embeds" in batch
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.cat([batch["negative_text_embeds"], batch["text_embeds"]]) if guided
            else batch["text_embeds"],
            "time_ids": torch.cat([batch["time_ids"]] * 2) if guided else batch["time_ids"]}
    return kw


def strided_batches(shards, rows: int, batch_size: int, device, dtype=torch.float32, model=None):
    """About `rows` rows taken evenly from every shard (so all timesteps), as batches of `model`'s inputs (a UNet's
    when None) on `device` (floating inputs in `dtype`)."""
    per_shard = max(1, rows // len(shards))
    for shard in shards:
        idx = torch.linspace(0, len(shard) - 1, min(per_shard, len(shard))).round().long().tolist()
        for a in range(0, len(idx), batch_size):
            yield cast_inputs(to_model_inputs(shard[idx[a:a + batch_size]], model), device, dtype)
