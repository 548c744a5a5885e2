"""Export a quantized run (scripts/train.py or scripts/quantize.py) as a PTQ-ready folder with packed
integer weights, and report its size.

    python scripts/export.py --run runs/dilatequant-w4a4 --out runs/dilatequant-w4a4/export
    python scripts/export.py --config configs/ptqd.yaml [key=value ...]              # PTQD on a qdiffusion run
    python scripts/export.py --config configs/dilatequant+ptqd.yaml mixed_precision.enabled=true

The config is `ExportConfig` (configs/schema.py): a YAML file and/or `key=value` overrides (`--run` and
`--out` are shorthands for `run=` and `out=`). RUN/quantized (the run's quantized model) is read; OUT is
written atomically (see export/folder.py for its layout). Load it back with
`qdistill.export.load_exported(OUT, mode="simulated" | "integer")`.

noise_correction=true (PTQD, DESIGN.md §3.7): records FP trajectories of the run's source model (`measure.*`,
every step kept), runs the quantized model (simulated) on their inputs, and stores the per-step statistics
(slope k, per-channel bias b, residual std σ_q) in the export; `scripts/eval.py` samples with them.

mixed_precision.enabled=true (PTQD's step-aware mixed precision): on the same FP trajectories, a high-precision
copy of the model is made (its low-bit activation quantizers at `mixed_precision.act_bits`, calibrated per
timestep; with `mixed_precision.weight_bits`, also its low-bit weights, quantized afresh from the FP model) and
each sampler step gets the model as trained or the high-precision copy (low where the low-precision residual
noise stays below the sampler's own noise; more steps low while the bit-operations exceed
`mixed_precision.bops_budget`, relative to FP). The schedule lives in the exported TPQ rows and second weight
copies (quantizers/mixed_precision.py) and is recorded with its bit-operations in quant_config.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qdistill.configs import ConfigError, load_config, to_dict
from qdistill.configs.schema import ExportConfig
from qdistill.data.model_folder import ModelFolderError, load_scheduler, load_unet, model_hash
from qdistill.data.trajectories import record_trajectories, seed_batches
from qdistill.export import ExportError, export_model
from qdistill.quantizers import NoiseCorrection, measure_noise_correction
from qdistill.quantizers.mixed_precision import StepBits, plan_step_bits, with_act_bits, with_weight_bits
from qdistill.trainer.checkpoint import META_FILE, CheckpointError, load_quantized


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML export config (configs/ptqd.yaml, ...); optional")
    parser.add_argument("--run", default=None, help="shorthand for run=RUN: a run folder or a quantized folder")
    parser.add_argument("--out", default=None, help="shorthand for out=OUT: the export folder to write")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --run/--out
    shorthands = [f"{k}={v}" for k, v in (("run", args.run), ("out", args.out)) if v is not None]
    try:
        cfg = load_config(ExportConfig, args.config, [*args.overrides, *shorthands])
        if not cfg.run:
            raise ConfigError("config key 'run' is required: the run folder to export (--run RUN or run=RUN)")
    except ConfigError as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    run = Path(cfg.run)
    out = Path(cfg.out) if cfg.out else run / "export"
    qdir = run / "quantized" if (run / "quantized" / META_FILE).is_file() else run
    try:
        if not (qdir / META_FILE).is_file():
            raise CheckpointError(f"{run} holds no quantized model ({run / 'quantized' / META_FILE} not found)")
        meta = json.loads((qdir / META_FILE).read_text())
        model = load_quantized(qdir)
        scheduler_config = None
        if meta.get("source_model"):
            try:
                scheduler_config = dict(load_scheduler(meta["source_model"]).config)
            except ModelFolderError as e:
                print(f"[export] note: no scheduler copied ({e})", file=sys.stderr)
        trained = meta.get("recipe", "unknown")
        recipe = cfg.recipe or (f"{trained}+ptqd" if cfg.noise_correction else trained)
        extra = {"run": str(run), "trained_recipe": trained, "export_config": to_dict(cfg)}
        correction = None
        if cfg.noise_correction or cfg.mixed_precision.enabled:
            fp, records, scheduler = fp_trajectories(model, meta, cfg)
            measured_on = {"source_model": meta["source_model"], **to_dict(cfg.measure),
                           "seeds": [cfg.measure.seed, cfg.measure.seed + cfg.measure.samples], "model_mode": "simulated"}
            if cfg.mixed_precision.enabled:
                plan = mix_precision(model, fp, meta, records, scheduler, cfg)
                extra["step_bits"] = {**plan.to_dict(), "measured_on": measured_on,
                                      "budget": cfg.mixed_precision.bops_budget}
            if cfg.noise_correction:  # measured on the model as exported, mixed precision included
                correction = measure_run_noise(model, records)
                extra["noise_correction_measured_on"] = measured_on
        size = export_model(model, out, recipe=recipe,
                            source_model=meta.get("source_model"), source_model_hash=meta.get("source_model_hash"),
                            scheduler_config=scheduler_config, noise_correction=correction, extra=extra)
    except (CheckpointError, ExportError, OSError, ValueError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    qc = meta["quant_config"]
    print(f"[export] {recipe} W{qc['weight_bits']}A{qc['act_bits']} → {out}")
    print(f"[export] quantized layers: {size['quantized_layers_packed_bytes'] / 1024:.1f} KiB packed vs "
          f"{size['quantized_layers_fp32_bytes'] / 1024:.1f} KiB FP32 ({size['quantized_layers_ratio']:.3f}×); "
          f"file {size['file_bytes'] / 1024:.1f} KiB vs FP32 model {size['fp32_model_bytes'] / 1024:.1f} KiB")
    if "step_weights_packed_bytes" in size:
        print(f"[export] second weight copies (step-aware mixed precision): "
              f"{size['step_weights_packed_bytes'] / 1024:.1f} KiB packed")
    return 0


def fp_trajectories(model, meta: dict, cfg: ExportConfig) -> tuple[object, list, object]:
    """The run's source (FP) model, its sampler trajectories (every step kept) and that sampler's scheduler."""
    if getattr(model.config, "cross_attention_dim", None):
        raise ExportError("noise_correction and mixed_precision support unconditional models only (the "
                          "trajectories hold no text conditioning)")
    if not meta.get("source_model"):
        raise ExportError("the run's quantized model records no source model; PTQD's measurements need the FP model")
    recorded_hash = meta.get("source_model_hash")
    if recorded_hash and model_hash(meta["source_model"]) != recorded_hash:
        raise ExportError(f"the source model {meta['source_model']} changed since the run (its hash differs from the "
                          "one the run recorded): its trajectories would not measure this quantized model")
    m = cfg.measure
    fp = load_unet(meta["source_model"]).eval()
    scheduler = load_scheduler(meta["source_model"], m.scheduler)
    seeds = list(range(m.seed, m.seed + m.samples))
    print(f"[export] PTQD: {m.samples} FP trajectories of {meta['source_model']}, {m.scheduler} {m.steps} steps "
          f"eta={m.eta}, all steps measured")
    records = [record for chunk in seed_batches(seeds, m.batch_size)
               for record in record_trajectories(fp, scheduler, chunk, m.steps, m.batch_size, m.eta,
                                                 keep_steps=None)[1]]
    return fp, records, scheduler


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
                             ({"sample": r.sample, "timestep": r.timestep} for r in records))
    if high is model:
        raise ExportError(f"mixed_precision: the model is already W{qc['weight_bits']}A{qc['act_bits']}; nothing to "
                          f"switch (mixed_precision.act_bits={mp.act_bits}, weight_bits={mp.weight_bits})")
    plan = plan_step_bits(model, high, scheduler, cfg.measure.steps, records, mp.bops_budget, cfg.measure.eta)
    low_name = f"W{qc['weight_bits']}A{qc['act_bits']}"
    high_name = f"W{max(plan.weight_bits)}A{max(plan.act_bits)}"
    print(f"[export] step-aware mixed precision ({low_name}/{high_name}): {sum(plan.high)} of {len(plan.high)} steps at "
          f"{high_name}, bit-operations {plan.relative_bops:.4f} of FP" +
          (f" (budget {mp.bops_budget})" if mp.bops_budget is not None else ""))
    print(f"[export] {'t':>6} {'bits':>6} {'noise ratio':>12}")
    for t, w, a, r in zip(plan.timesteps, plan.weight_bits, plan.act_bits, plan.noise_ratio):
        print(f"[export] {t:6.0f} {f'W{w}A{a}':>6} {r:12.3f}")
    return plan


def measure_run_noise(model, records: list) -> NoiseCorrection:
    """PTQD statistics of the quantized (simulated) `model` on the FP trajectories' inputs."""
    correction = measure_noise_correction(model, records)
    print(f"[export] {'t':>6} {'k':>9} {'mean|b|':>9} {'sigma_q':>9}")
    for i in reversed(range(correction.timesteps.numel())):  # sampler order
        print(f"[export] {correction.timesteps[i].item():6.0f} {correction.k[i].item():9.4f} "
              f"{correction.bias[i].abs().mean().item():9.2e} {correction.sigma[i].item():9.2e}")
    return correction


if __name__ == "__main__":
    sys.exit(main())
