"""export: a quantized run (`qdistill train` or `qdistill quantize`) as a PTQ-ready folder with packed integer
weights, and its size.

    qdistill export run=runs/dilatequant-w4a4 [out=runs/dilatequant-w4a4/export]
    qdistill export --config ptqd [key=value ...]                        # PTQD on a qdiffusion run
    qdistill export --config dilatequant+ptqd mixed_precision.enabled=true
    qdistill export run=RUN --format onnx onnx_groups=4                  # also OUT/onnx/: QDQ graphs

The config is `ExportConfig` (configs/schema.py; `--run` and `--out` are shorthands for `run=` and `out=`). RUN/quantized (the run's quantized model) is read; OUT is
written atomically (see export/folder.py for its layout). Load it back with
`qdistill.export.load_exported(OUT, mode="simulated" | "integer")`.

noise_correction=true (PTQD, docs/design.md §3.7): records FP trajectories of the run's source model (`measure.*`,
every step kept), runs the quantized model (simulated) on their inputs, and stores the per-step statistics
(slope k, per-channel bias b, residual std σ_q) in the export; `qdistill eval` samples with them.

format=onnx also writes OUT/onnx/: one ONNX graph with QuantizeLinear/DequantizeLinear nodes per group of
timesteps (`onnx_groups`, chosen from the TPQ tables), for ONNX Runtime, TensorRT or OpenVINO (export/onnx_qdq.py).

mixed_precision.enabled=true (PTQD's step-aware mixed precision): on the same FP trajectories, a high-precision
copy of the model is made (its low-bit activation quantizers at `mixed_precision.act_bits`, calibrated per
timestep; with `mixed_precision.weight_bits`, also its low-bit weights, quantized afresh from the FP model) and
each sampler step gets the model as trained or the high-precision copy (low where the low-precision residual
noise stays below the sampler's own noise; more steps low while the bit-operations exceed
`mixed_precision.bops_budget`, relative to FP). The schedule lives in the exported TPQ rows and second weight
copies (quantizers/mixed_precision.py) and is recorded with its bit-operations in quant_config.json.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..configs import to_dict
from ..configs.schema import ExportConfig
from ..data.model_folder import load_denoiser, load_scheduler, model_hash
from ..denoisers import model_kwargs, num_classes, text_dim
from ..data.calibration import text_conditioning
from ..data.calibration_set import read_manifest
from ..data.prompts import load_prompts
from ..data.trajectories import Conditioning, class_labels, is_flow_matching, record_trajectories, seed_batches
from ..devices import autocast, resolve_device
from ..errors import ConfigError, ExportError, ModelFolderError
from ..export import export_model, load_quantized
from ..export.onnx_qdq import ONNX_DIR, export_onnx
from ..export.quantized import quantized_folder, read_quantized_meta
from ..analysis.noise_statistics import measure_noise_correction
from ..analysis.step_bits import plan_step_bits
from ..quantizers import NoiseCorrection, bits_tag
from ..quantizers.mixed_precision import StepBits, with_act_bits, with_weight_bits

logger = logging.getLogger(__name__)


def export(cfg: ExportConfig) -> dict:
    """Export `cfg.run` to `cfg.out` (default RUN/export); returns the size report (bytes)."""
    if not cfg.run:
        raise ConfigError("config key 'run' is required: the run folder to export (--run RUN or run=RUN)")
    run = Path(cfg.run)
    out = Path(cfg.out) if cfg.out else run / "export"
    qdir = quantized_folder(run)
    meta = read_quantized_meta(qdir)
    qc = meta["quant_config"]
    if cfg.format == "onnx" and qc.get("weight_group_size") and qc.get("weight_bits", 8) <= 4:
        raise ExportError(f"format=onnx: {qdir} has group-wise weights (quant.weight_group_size="
                          f"{qc['weight_group_size']}), which need blocked DequantizeLinear (opset 21); not supported")
    device = resolve_device(cfg.device)
    model = load_quantized(qdir, device=device)
    logger.info(f"{qdir} on {device}")
    scheduler_config = None
    if meta.get("source_model"):
        try:
            scheduler = load_scheduler(meta["source_model"])  # a bare model folder gets a default DDPM one
            scheduler_config = {"_class_name": type(scheduler).__name__, **scheduler.config}
        except ModelFolderError as e:
            logger.warning(f"no scheduler copied ({e})")
    trained = meta.get("recipe", "unknown")
    recipe = cfg.recipe or (f"{trained}+ptqd" if cfg.noise_correction else trained)
    extra = {"run": str(run), "trained_recipe": trained, "export_config": to_dict(cfg)}
    correction = None
    if cfg.mixed_precision.enabled and (text_dim(model) or num_classes(model)):
        raise ExportError("mixed_precision.enabled=true supports unconditional models only (its plan samples without "
                          "conditioning); noise_correction=true alone measures conditional models")
    if cfg.noise_correction or cfg.mixed_precision.enabled:
        with autocast(device, cfg.precision):
            fp, records, scheduler = fp_trajectories(model, meta, cfg)
        measured_on = {"source_model": meta["source_model"], **to_dict(cfg.measure),
                       "seeds": [cfg.measure.seed, cfg.measure.seed + cfg.measure.num_samples], "model_mode": "simulated",
                       "precision": cfg.precision}
        if cfg.mixed_precision.enabled:
            with autocast(device, cfg.precision):
                plan = mix_precision(model, fp, meta, records, scheduler, cfg)
            extra["step_bits"] = {**plan.to_dict(), "measured_on": measured_on, "budget": cfg.mixed_precision.bops_budget}
        if cfg.noise_correction:  # measured on the model as exported, mixed precision included
            with autocast(device, cfg.precision):
                correction = measure_run_noise(model, records)
            extra["noise_correction_measured_on"] = measured_on
    size = export_model(model, out, recipe=recipe,
                        source_model=meta.get("source_model"), source_model_hash=meta.get("source_model_hash"),
                        scheduler_config=scheduler_config, noise_correction=correction, extra=extra)
    logger.info(f"{recipe} {bits_tag(qc['weight_bits'], qc['act_bits'])} → {out}")
    logger.info(f"quantized layers: {size['quantized_layers_packed_bytes'] / 1024:.1f} KiB packed vs "
                f"{size['quantized_layers_fp32_bytes'] / 1024:.1f} KiB FP32 ({size['quantized_layers_ratio']:.3f}×); "
                f"file {size['file_bytes'] / 1024:.1f} KiB vs FP32 model {size['fp32_model_bytes'] / 1024:.1f} KiB")
    if "step_weights_packed_bytes" in size:
        logger.info(f"second weight copies (step-aware mixed precision): "
                    f"{size['step_weights_packed_bytes'] / 1024:.1f} KiB packed")
    report = {**size, "path": str(out), "recipe": recipe}
    if cfg.format == "onnx":  # QDQ graphs of the export just written (export/onnx_qdq.py)
        manifest = export_onnx(out, cfg.onnx_groups)
        onnx_bytes = sum(f["bytes"] for f in manifest["files"].values())
        logger.info(f"ONNX (QDQ, opset {manifest['opset']}): {len(manifest['groups'])} graph(s), "
                    f"{onnx_bytes / 1024:.1f} KiB → {out / ONNX_DIR}; run with qdistill.export.OnnxDenoiser")
        report["onnx"] = {"path": str(out / ONNX_DIR), "groups": [g["timesteps"] for g in manifest["groups"]],
                          "bytes": onnx_bytes}
    return report


def fp_trajectories(model, meta: dict, cfg: ExportConfig) -> tuple[object, list, object]:
    """The run's source (FP) model, its sampler trajectories (every step kept, with the conditioning the run
    was calibrated with) and that sampler's scheduler."""
    if not meta.get("source_model"):
        raise ExportError("the run's quantized model records no source model; PTQD's measurements need the FP model")
    recorded_hash = meta.get("source_model_hash")
    if recorded_hash and model_hash(meta["source_model"]) != recorded_hash:
        raise ExportError(f"the source model {meta['source_model']} changed since the run (its hash differs from the "
                          "one the run recorded): its trajectories would not measure this quantized model")
    own = load_scheduler(meta["source_model"])
    if is_flow_matching(own):
        raise ExportError(f"PTQD's correction (noise_correction, mixed_precision) is derived for DDPM-style "
                          f"ε-prediction samplers; {meta['source_model']} samples with {type(own).__name__} (flow "
                          "matching), for which it is not derived")
    m = cfg.measure
    device = next(model.parameters()).device
    fp = load_denoiser(meta["source_model"]).eval().to(device)
    scheduler = load_scheduler(meta["source_model"], m.scheduler)
    cond_for = measurement_conditioning(fp, meta, m.seed, device)
    seeds = list(range(m.seed, m.seed + m.num_samples))
    logger.info(f"PTQD: {m.num_samples} FP trajectories of {meta['source_model']}, {m.scheduler} {m.steps} steps "
                f"eta={m.eta}, all steps measured, {cfg.precision}")
    records = [record for chunk in seed_batches(seeds, m.batch_size)
               for record in record_trajectories(fp, scheduler, chunk, m.steps, m.batch_size, m.eta,
                                                 keep_steps=None, cond_for=cond_for)[1]]
    return fp, records, scheduler


def measurement_conditioning(fp, meta: dict, first_seed: int, device):
    """batch_seeds → Conditioning for PTQD's trajectories: class labels as calibration draws them, or the
    prompts, guidance and negative prompt the run's trajectories were recorded with (None: unconditional)."""
    n = num_classes(fp)
    if n:
        return lambda seeds: Conditioning(class_labels=class_labels(seeds, n))
    if text_dim(fp) is None:
        return None
    trajectories = (meta.get("run_config") or {}).get("trajectories")
    if not trajectories:
        raise ExportError("a text-conditional run needs its trajectories folder (its prompts and guidance) for PTQD's "
                          "measurements; the quantized model records none")
    manifest = read_manifest(trajectories)
    prompts = manifest.get("prompts")
    if not prompts or not Path(prompts).exists():
        raise ExportError(f"the prompts {prompts!r} that {Path(trajectories) / 'manifest.json'} was recorded with are "
                          "not found; PTQD measures the model on them")
    cond_for, _ = text_conditioning(meta["source_model"], fp, load_prompts(prompts), first_seed,
                                    manifest.get("guidance_scale", 1.0), manifest.get("negative_prompt", ""), device)
    return cond_for


def mix_precision(model, fp, meta: dict, records: list, scheduler, cfg: ExportConfig) -> StepBits:
    """Step-aware mixed precision between the model as trained and a high-precision copy, applied to `model`
    in place."""
    mp, qc = cfg.mixed_precision, meta["quant_config"]
    high = model
    if mp.weight_bits is not None and mp.weight_bits != qc["weight_bits"]:
        if mp.weight_bits < qc["weight_bits"]:
            raise ExportError(f"mixed_precision.weight_bits ({mp.weight_bits}) must exceed the model's weight bits "
                              f"({qc['weight_bits']})")
        high = with_weight_bits(high, qc["weight_bits"], mp.weight_bits, fp if mp.weight_source == "fp" else None)
    if mp.act_bits != qc["act_bits"]:
        if mp.act_bits < qc["act_bits"]:
            raise ExportError(f"mixed_precision.act_bits ({mp.act_bits}) must exceed the model's activation bits "
                              f"({qc['act_bits']})")
        high = with_act_bits(high, qc["act_bits"], mp.act_bits,
                             (model_kwargs(model, r.sample, r.timestep) for r in records))
    if high is model:
        raise ExportError(f"mixed_precision: the model is already {bits_tag(qc['weight_bits'], qc['act_bits'])}; nothing to "
                          f"switch (mixed_precision.act_bits={mp.act_bits}, weight_bits={mp.weight_bits})")
    try:  # e.g. a budget below the cost of the all-low schedule
        plan = plan_step_bits(model, high, scheduler, cfg.measure.steps, records, mp.bops_budget, cfg.measure.eta)
    except ValueError as e:
        raise ExportError(f"mixed_precision: {e}") from None
    low_name = bits_tag(qc["weight_bits"], qc["act_bits"])
    high_name = bits_tag(max(plan.weight_bits), max(plan.act_bits))
    logger.info(f"step-aware mixed precision ({low_name}/{high_name}): {sum(plan.high)} of {len(plan.high)} steps at "
                f"{high_name}, bit-operations {plan.relative_bops:.4f} of FP" +
                (f" (budget {mp.bops_budget})" if mp.bops_budget is not None else ""))
    logger.info(f"{'t':>6} {'bits':>6} {'noise ratio':>12}")
    for t, w, a, r in zip(plan.timesteps, plan.weight_bits, plan.act_bits, plan.noise_ratio):
        logger.info(f"{t:6.0f} {bits_tag(w, a):>6} {r:12.3f}")
    return plan


def measure_run_noise(model, records: list) -> NoiseCorrection:
    """PTQD statistics of the quantized (simulated) `model` on the FP trajectories' inputs."""
    try:  # e.g. a quantized prediction anti-correlated with the FP one (slope <= -1)
        correction = measure_noise_correction(model, records)
    except ValueError as e:
        raise ExportError(f"noise_correction: {e}") from None
    logger.info(f"{'t':>6} {'k':>9} {'mean|b|':>9} {'sigma_q':>9}")
    for i in reversed(range(correction.timesteps.numel())):  # sampler order
        logger.info(f"{correction.timesteps[i].item():6.0f} {correction.k[i].item():9.4f} "
                    f"{correction.bias[i].abs().mean().item():9.2e} {correction.sigma[i].item():9.2e}")
    return correction
