"""eval: judge an exported quantized model, apart from training: sample it on fixed seeds and compare with the
data and the FP model. Reads only export folders (`qdistill export`) and, optionally, the FP model folder.

1. load the export (`mode=integer`: int8 kernels; `simulated`: float kernels, bit-exact with training);
2. sample N seeds with the chosen diffusers scheduler, seed batches split across ranks under torchrun (an export
   with PTQD's statistics, or `ptqd=true`: the quantized model through PTQD's noise-corrected scheduler;
   `ptqd=false`: plain; FP stays plain); class-conditional models sample each seed's own label, balanced over
   the classes (data/trajectories.py, as calibration does);
3. the FP reference on the same seeds (cached by model hash and sampler settings: not resampled next time);
4. metrics: FD in the bench classifier's features (to the test split, for FP too, and quantized vs FP);
   FID/sFID/IS with a local feature network (`inception=FILE`); PSNR and SSIM of final samples vs FP;
   per-step noise-prediction MSE on the FP trajectory; CLIP score for text-conditional models (`clip=FOLDER`);
5. EVAL/metrics.json, EVAL/samples.png (FP | quantized), TensorBoard scalars in EVAL/tb.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from ..configs.schema import EvalConfig
from ..data.model_folder import (convert_scheduler, load_denoiser, load_pipeline, load_scheduler, model_hash,
                                 scheduler_from_file)
from ..denoisers import text_dim
from ..devices import autocast, resolve_device
from ..distributed_env import from_rank0, process_group
from ..errors import ConfigError, ExportError
from ..evaluation.classifier_fd import BenchClassifier, classifier_quality
from ..evaluation.clip import clip_score
from ..evaluation.fidelity import from_uint8, psnr, save_grid
from ..evaluation.frechet import frechet_distance
from ..evaluation.inception import inception_metrics, load_feature_network
from ..evaluation.reference_cache import default_cache_dir, load_reference, reference_key, save_reference
from ..evaluation.sampling import (noise_pred_mse_per_step, recorded_calls,
                                   sample_across_ranks, sample_batch)
from ..export import load_exported, load_noise_correction, read_export_meta
from ..files import atomic_write_text, shipped
from ..quantizers import NoiseCorrectedScheduler, bits_tag

logger = logging.getLogger(__name__)


def evaluate(cfg: EvalConfig) -> dict | None:
    """Evaluate the export `cfg.model`; returns the metrics written to OUT/metrics.json on rank 0 (None on the
    other ranks)."""
    if not cfg.model:
        raise ConfigError("config key 'model' is required: the export folder to evaluate (model=EXPORT)")
    with process_group("gloo") as (rank, world, local_rank):
        return _evaluate(cfg, rank, world, local_rank)


def _evaluate(cfg: EvalConfig, rank: int, world: int, local_rank: int) -> dict | None:
    log = logger.info if rank == 0 else (lambda msg: None)
    out = Path(cfg.out) if cfg.out else Path(cfg.model) / "eval"
    ptqd = cfg.ptqd

    # 1. the export, its scheduler, the FP model
    meta = read_export_meta(cfg.model)
    if ptqd is None:  # the export decides: a ptqd export is sampled the way it was made for
        ptqd = "noise_correction" in meta
    correction = load_noise_correction(cfg.model) if ptqd else None
    if ptqd and correction is None:
        raise ExportError(f"ptqd=true: {cfg.model} holds no noise-correction statistics (export it with "
                          "`qdistill export noise_correction=true`)")
    device = resolve_device(cfg.device, local_rank)
    q_device = device  # integer mode: oneDNN int8 kernels on the CPU; on CUDA torch._int_mm linears, convs simulated
    qunet = load_exported(cfg.model, cfg.mode, device=q_device, compile=cfg.compile)
    exported_scheduler = Path(cfg.model) / "scheduler_config.json"
    if exported_scheduler.is_file():
        base = scheduler_from_file(exported_scheduler)
    elif cfg.reference is not None:
        base = load_scheduler(cfg.reference)
    else:
        raise ExportError(f"{cfg.model} has no scheduler_config.json; set reference=FP_MODEL")
    scheduler = convert_scheduler(base, cfg.scheduler)
    q_scheduler = scheduler
    if ptqd:
        try:
            q_scheduler = NoiseCorrectedScheduler(scheduler, correction)
        except (TypeError, ValueError) as e:  # e.g. scheduler=dpm: PTQD wraps DDIM and DDPM only
            raise ExportError(f"PTQD noise correction (ptqd=true; ptqd=false samples plainly): {e}") from None
    fp = load_denoiser(cfg.reference).eval().to(device) if cfg.reference else None
    pipe_kwargs = {}
    if text_dim(qunet):
        if cfg.reference is None or cfg.prompts is None:
            raise ExportError("a text-conditional model needs reference= (its pipeline folder) and prompts=")
        if not Path(cfg.prompts).is_file():
            raise ConfigError(f"config key 'prompts': file not found: {cfg.prompts}")
        prompts = [line.strip() for line in Path(cfg.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ExportError(f"{cfg.prompts} holds no prompts")
        pipeline = load_pipeline(cfg.reference)
        pipeline.set_progress_bar_config(disable=True)
        pipe_kwargs = {"pipeline": pipeline, "prompts": prompts, "guidance_scale": cfg.guidance_scale}
    if cfg.sample_size:  # the latent size calibration used (another than the model's default)
        pipe_kwargs["size"] = cfg.sample_size
    bits = bits_tag(meta["quant_config"]["weight_bits"], meta["quant_config"]["act_bits"])
    sampler = f"{cfg.scheduler} {cfg.steps} steps eta={cfg.eta}" + (" + PTQD noise correction" if ptqd else "")
    if ptqd:
        log(f"quantized samples with PTQD noise correction ({meta['noise_correction']['steps']} measured steps); "
            "FP reference with the plain scheduler")
    log(f"{meta['recipe']} {bits} from {cfg.model} ({cfg.mode} on {q_device}; FP reference on {device}); "
        f"{cfg.num_samples} seeds from {cfg.seed}, {sampler}, {world} rank(s), {cfg.precision}")

    # 2. quantized samples
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_samples))
    t0 = time.time()
    with autocast(q_device, cfg.precision if cfg.mode == "simulated" else "fp32"):  # int8 kernels: as they are
        q_images = sample_across_ranks(qunet, q_scheduler, seeds, cfg.steps, cfg.batch_size, cfg.eta, rank, world,
                                       desc=f"{bits} samples", **pipe_kwargs)
    sampling_seconds = time.time() - t0

    # 3. FP reference, cached
    fp_images = calls = None
    if fp is not None:
        settings = {"model_hash": from_rank0(lambda: model_hash(cfg.reference), rank, world),  # hashed once
                    "scheduler": dict(scheduler.config), "steps": cfg.steps, "eta": cfg.eta,
                    "seeds": [cfg.seed, cfg.num_samples], "batch_size": cfg.batch_size,
                    "fidelity_samples": cfg.fidelity_samples, "guidance_scale": cfg.guidance_scale,
                    "precision": cfg.precision,
                    "prompts": hashlib.sha256("\n".join(pipe_kwargs.get("prompts", [])).encode()).hexdigest(),
                    **({"sample_size": cfg.sample_size} if cfg.sample_size else {})}  # earlier caches keep their keys
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        key = reference_key(settings)
        cached = load_reference(cache_dir, key)
        if cached is not None:
            fp_images, calls = cached
            log(f"FP reference from cache {cache_dir / key}")
        else:
            with autocast(device, cfg.precision):
                fp_images = sample_across_ranks(fp, scheduler, seeds, cfg.steps, cfg.batch_size, cfg.eta, rank,
                                                world, desc="FP samples", **pipe_kwargs)
                calls = []
                if rank == 0:
                    with recorded_calls(fp, calls):
                        sample_batch(fp, scheduler, seeds[:cfg.fidelity_samples], cfg.steps, cfg.eta, **pipe_kwargs)
            if rank == 0:
                save_reference(cache_dir, key, settings, fp_images, calls)
                log(f"FP reference cached in {cache_dir / key}")

    # 4. metrics (rank 0)
    if rank == 0:
        metrics = {"model": cfg.model, "recipe": meta["recipe"], "bits": bits, "mode": cfg.mode,
                   "sampler": sampler, "num_samples": cfg.num_samples, "seeds": [cfg.seed, cfg.seed + cfg.num_samples],
                   "ptqd_noise_correction": ptqd, "world_size": world, "device": str(q_device),
                   "precision": cfg.precision,
                   "sampling_seconds": round(sampling_seconds, 2),
                   "export_file_bytes": meta["size"]["file_bytes"]}
        if cfg.mode == "integer":
            report = qunet.qdistill_export["integer_report"]
            metrics["integer_layers"] = len(report["integer"])
            if "saturation_risk" in report:
                metrics["integer_saturation_risk"] = report["saturation_risk"]
            metrics["simulated_modules"] = sum(len(v) for v in report["simulated"].values())
            metrics["attention_on_codes"] = len(report["attention"])
            metrics["linear_kernel"] = report["linear_kernel"]
            if cfg.compile:
                metrics.update(qunet.qdistill_compile)  # compile_seconds: the first compiled call's
        metrics.update(compute_metrics(cfg, q_images, fp_images, calls, qunet, pipe_kwargs))
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        grid = save_grid([from_uint8(x[:64]) for x in ([fp_images] if fp_images is not None else []) + [q_images]],
                         out / "samples.png")
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out / "tb")) as writer:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"eval/{name}", value)
        log(f"wrote {out / 'metrics.json'} and {grid} ({'FP | quantized' if fp_images is not None else 'quantized'})")
        log_table(metrics)
    if world > 1:
        torch.distributed.barrier()
    return metrics if rank == 0 else None


def compute_metrics(cfg, q_images, fp_images, calls, qunet, pipe_kwargs) -> dict:
    from torchmetrics.functional.image import structural_similarity_index_measure

    metrics = {}
    q = from_uint8(q_images)
    fp = from_uint8(fp_images) if fp_images is not None else None
    classifier = shipped(cfg.classifier)
    if (classifier / "config.json").is_file() and tuple(q.shape[1:]) == (1, 32, 32):
        record = classifier_quality(q, classifier)
        metrics.update(fd=record["fd"], min_class_share=record["min_class_share"])
        if fp is not None:
            metrics["fd_fp"] = classifier_quality(fp, classifier)["fd"]
            metrics["delta_fd"] = metrics["fd"] - metrics["fd_fp"]
            metrics["fd_vs_fp_samples"] = frechet_distance(BenchClassifier.load(classifier).features, q, fp)
    if cfg.inception and fp_images is not None:
        network = load_feature_network(cfg.inception)
        metrics.update({f"{k}_vs_fp": v for k, v in inception_metrics(network, q_images, fp_images).items()
                        if k != "is"})
        inception = inception_metrics(network, q_images, q_images)
        if "is" in inception:
            metrics["is"] = inception["is"]
            metrics["is_fp"] = inception_metrics(network, fp_images, fp_images)["is"]
    if fp is not None:
        metrics["psnr_db"] = float(psnr(q, fp).mean())
        metrics["ssim"] = float(structural_similarity_index_measure((q + 1) / 2, (fp + 1) / 2, data_range=1.0))
        q_device = next(qunet.parameters()).device
        with autocast(q_device, cfg.precision if cfg.mode == "simulated" else "fp32"):  # as the samples were made
            per_step = noise_pred_mse_per_step(qunet, calls, cfg.steps)
        metrics["noise_pred_mse_mean"] = sum(per_step.values()) / len(per_step)
        metrics["noise_pred_mse_per_step"] = per_step
    if cfg.clip and "prompts" in pipe_kwargs:
        prompts = [pipe_kwargs["prompts"][s % len(pipe_kwargs["prompts"])]
                   for s in range(cfg.seed, cfg.seed + cfg.num_samples)]
        metrics["clip_score"] = clip_score(q_images, prompts, cfg.clip)
        if fp_images is not None:
            metrics["clip_score_fp"] = clip_score(fp_images, prompts, cfg.clip)
    return metrics


def log_table(metrics: dict) -> None:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    logger.info(f"{'metric':<{width}}  value")
    for k, v in rows:
        logger.info(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
