"""Recording calibration trajectories from a model folder: the FP sampler run on fixed seeds, the chosen
steps of every trajectory written as shards (see calibration_set). Under torchrun each rank records its
own batches; rank 0 writes the manifest once all are done."""
from __future__ import annotations

import inspect
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ..devices import autocast, resolve_device
from ..errors import CalibrationSetError
from ..progress import progress
from .calibration_set import MANIFEST, SHARDS, rows_from_records, shard_name, write_manifest, write_shard
from .model_folder import ModelFolderError, load_denoiser, load_pipeline, load_scheduler, model_hash, resolve
from .prompts import load_prompts
from ..denoisers import forward_parameters, is_flux, latent_name, latent_shape, latent_size, num_classes, text_dim
from .trajectories import (Conditioning, class_labels, random_steps, record_trajectories, seed_batches,
                           uniform_steps)

logger = logging.getLogger(__name__)


def selected_steps(cfg, seed: int) -> set[int]:
    """The steps of sample `seed`'s trajectory that are kept (the documented selection modes)."""
    if cfg.selection == "all":
        return set(range(cfg.steps))
    if cfg.selection == "uniform":
        return set(uniform_steps(cfg.steps, cfg.every))
    return set(random_steps(seed, cfg.steps, cfg.random_per_sample))


def _load_text_pipeline(path: str):
    pipe = load_pipeline(path)
    if not hasattr(pipe, "encode_prompt"):
        raise ModelFolderError(f"{path}: {type(pipe).__name__} has no encode_prompt; cannot encode prompts")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def conditioning_source(cfg, unet, device=None):
    """A function batch_seeds → Conditioning (or None for unconditional models), and the recorded kind ("none",
    "class", "text", or "text_time" for SDXL-class UNets, which also take pooled embeddings and time_ids)."""
    n = num_classes(unet)
    if n:
        return (lambda seeds: Conditioning(class_labels=class_labels(seeds, n))), "class"
    if text_dim(unet) is None:
        return None, "none"
    if cfg.prompts is None:
        raise ModelFolderError(f"{cfg.model}: {type(unet).__name__} is text-conditional; set prompts=FILE "
                               "(text, JSONL or a saved datasets folder)")
    return text_conditioning(cfg.model, unet, load_prompts(cfg.prompts), cfg.seed, cfg.guidance_scale,
                             cfg.negative_prompt, device, getattr(cfg, "sample_size", 0) or None)


def text_conditioning(model: str, unet, prompts: list[str], first_seed: int, guidance_scale: float,
                      negative_prompt: str, device=None, size: int | None = None):
    """(batch_seeds → Conditioning, kind) from the pipeline folder's own text encoders: seed s gets prompt
    (s - first_seed) mod len(prompts). What is recorded follows the model's inputs: text embeddings (and their
    negatives under guidance); SDXL's pooled embeddings and time_ids; PixArt's caption masks; SD3's and Flux's
    pooled projections; Flux's distilled guidance (`guidance_scale`, an input of the model, not CFG)."""
    device = device or torch.device("cpu")
    pipe = _load_text_pipeline(model)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(device)
    if latent_name(unet) != "sample":
        return _transformer_text_conditioning(pipe, unet, prompts, first_seed, guidance_scale, negative_prompt, device)
    guided = guidance_scale != 1.0
    text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if text_time:  # SDXL's default micro-conditioning: generated at full size, uncropped
        h, w = latent_size(unet, size)
        scale = getattr(pipe, "vae_scale_factor", 8)
        time_ids = torch.tensor([h * scale, w * scale, 0, 0, h * scale, w * scale], dtype=torch.float32)

    def cond_for(seeds):
        texts = [prompts[(s - first_seed) % len(prompts)] for s in seeds]
        with torch.no_grad():
            encoded = pipe.encode_prompt(prompt=texts, device=device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=guided,
                                         # "" leaves the negative to the pipeline's default, as sampling
                                         # does (SDXL: zeros when force_zeros_for_empty_prompt)
                                         negative_prompt=[negative_prompt] * len(texts) if guided and negative_prompt
                                         else None)
        emb, neg = encoded[0], encoded[1] if guided else None
        if not text_time:
            return Conditioning(encoder_hidden_states=emb, negative_encoder_hidden_states=neg,
                                guidance_scale=guidance_scale)
        if len(encoded) != 4:
            raise ModelFolderError(f"{model}: the UNet takes pooled text embeddings (addition_embed_type text_time) "
                                   f"but {type(pipe).__name__}.encode_prompt returns {len(encoded)} values, not 4")
        return Conditioning(encoder_hidden_states=emb, negative_encoder_hidden_states=neg,
                            guidance_scale=guidance_scale, text_embeds=encoded[2],
                            negative_text_embeds=encoded[3] if guided else None,
                            time_ids=time_ids.to(emb.device).expand(len(seeds), -1))

    return cond_for, "text_time" if text_time else "text"


def _transformer_text_conditioning(pipe, model, prompts, first_seed, guidance_scale, negative_prompt, device):
    """PixArt (embeddings, caption mask), SD3 (embeddings, pooled) and Flux (embeddings, pooled, distilled guidance)
    from their pipelines' own `encode_prompt`."""
    takes = set(inspect.signature(pipe.encode_prompt).parameters)
    flux = is_flux(model)
    guided = guidance_scale != 1.0 and not flux  # Flux's guidance is an input of the model

    def cond_for(seeds):
        texts = [prompts[(s - first_seed) % len(prompts)] for s in seeds]
        kw = {"prompt": texts, "device": device, "num_images_per_prompt": 1}
        kw.update({k: None for k in ("prompt_2", "prompt_3") if k in takes})  # the prompt for every encoder
        if "do_classifier_free_guidance" in takes:
            kw["do_classifier_free_guidance"] = guided
            if guided and negative_prompt:  # else the pipeline's default negative, as its own sampling uses
                kw["negative_prompt"] = [negative_prompt] * len(texts)
        with torch.no_grad():
            encoded = pipe.encode_prompt(**kw)
        if flux:  # (embeddings, pooled, text ids)
            guidance = torch.full((len(seeds),), float(guidance_scale), device=device) \
                if model.config.get("guidance_embeds") else None
            return Conditioning(encoder_hidden_states=encoded[0], pooled_projections=encoded[1], guidance=guidance)
        if "pooled_projections" in forward_parameters(model):  # SD3: (embeddings, negative, pooled, negative pooled)
            return Conditioning(encoder_hidden_states=encoded[0], negative_encoder_hidden_states=encoded[1] if guided
                                else None, guidance_scale=guidance_scale, pooled_projections=encoded[2],
                                negative_pooled_projections=encoded[3] if guided else None)
        # PixArt: (embeddings, mask, negative, negative mask)
        return Conditioning(encoder_hidden_states=encoded[0], encoder_attention_mask=encoded[1],
                            negative_encoder_hidden_states=encoded[2] if guided else None,
                            negative_encoder_attention_mask=encoded[3] if guided else None,
                            guidance_scale=guidance_scale)

    return cond_for, "text"


def _per_sample(cond: Conditioning | None, seeds: list[int]) -> dict[int, Conditioning]:
    return {} if cond is None else {s: cond.select(j) for j, s in enumerate(seeds)}


def record_calibration_set(cfg, rank: int = 0, world_size: int = 1, barrier=lambda: None) -> dict | None:
    """Record this rank's shards of the trajectory folder `cfg.out`; rank 0 returns the manifest."""
    out = Path(cfg.out)
    if (out / MANIFEST).exists():
        if not cfg.overwrite:
            raise CalibrationSetError(f"{out / MANIFEST} exists: this folder is complete (overwrite=true to record again)")
        barrier()
        if rank == 0:
            (out / MANIFEST).unlink()
            shutil.rmtree(out / SHARDS, ignore_errors=True)
        barrier()
    resolve(cfg.model)
    device = resolve_device(cfg.device)
    unet = load_denoiser(cfg.model).eval().to(device)
    if rank == 0:
        logger.info(f"recording on {device}, {cfg.precision}")
    scheduler = load_scheduler(cfg.model, cfg.scheduler)
    cond_for, conditioning = conditioning_source(cfg, unet, device)
    size = cfg.sample_size or None
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_samples))
    batches = seed_batches(seeds, cfg.batch_size)
    mine = [i for i in range(len(batches)) if i % world_size == rank]
    todo = [i for i in mine if not (out / SHARDS / shard_name(i)).is_dir()]
    if len(todo) < len(mine) and rank == 0:
        logger.info(f"resuming: {len(mine) - len(todo)} of this rank's {len(mine)} shards already on disk")
    t0 = time.time()
    for i in progress(todo, f"calibrate rank {rank}", disable=rank != 0, logger=logger):
        chunk = batches[i]
        conds: dict[int, Conditioning] = {}

        def batch_cond(batch_seeds):
            cond = cond_for(batch_seeds) if cond_for else None
            conds.update(_per_sample(cond, batch_seeds))
            return cond

        with autocast(device, cfg.precision):
            _, records = record_trajectories(unet, scheduler, chunk, cfg.steps, len(chunk), cfg.eta, None,
                                             batch_cond if cond_for else None, size)
        keep = {s: selected_steps(cfg, s) for s in chunk}
        write_shard(out, i, rows_from_records(records, keep, conds))
    seconds = time.time() - t0
    barrier()
    if rank != 0:
        return None
    info = {
        "source_model": str(cfg.model), "source_model_hash": model_hash(cfg.model),
        "model_class": type(unet).__name__,
        "scheduler": {"class": type(scheduler).__name__, "config": json.loads(json.dumps(dict(scheduler.config), default=str))},
        "num_steps": cfg.steps, "eta": cfg.eta,
        "seeds": {"start": cfg.seed, "count": cfg.num_samples, "batch_size": cfg.batch_size},
        "selection": {"mode": cfg.selection, "every": cfg.every, "random_per_sample": cfg.random_per_sample},
        "conditioning": conditioning, "guidance_scale": cfg.guidance_scale,
        "prompts": cfg.prompts, "negative_prompt": cfg.negative_prompt,
        "sample_size": latent_size(unet, size)[0],
        "shapes": {"x_t": list(latent_shape(unet, size)), "noise_pred": list(latent_shape(unet, size))},
        "dtype": "float32", "precision": cfg.precision,
        "recorded_by": {"world_size": world_size, "seconds_rank0": seconds},
    }
    return write_manifest(out, len(batches), info)
