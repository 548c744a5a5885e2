"""Export a quantized run (scripts/train.py or scripts/quantize.py) as a PTQ-ready folder with packed
integer weights, and report its size.

    python scripts/export.py --run runs/dilatequant-w4a4 --out runs/dilatequant-w4a4/export [--noise-correction]

RUN/quantized (the run's quantized model) is read; OUT is written atomically (see export/folder.py for
its layout). Load it back with `qdistill.export.load_exported(OUT, mode="simulated" | "integer")`.

--noise-correction (PTQD, DESIGN.md §3.7): records FP trajectories of the run's source model (every step
kept), runs the quantized model (simulated) on their inputs, and stores the per-step statistics (slope k,
per-channel bias b, residual std σ_q) in the export; `scripts/eval.py --ptqd` samples with them.

--mixed-precision (PTQD's step-aware mixed precision): on the same FP trajectories, a copy of the model with
its low-bit activation quantizers at 8 bits is calibrated per timestep, and each sampler step gets the low or
the 8-bit tables (low where the low-bit residual noise stays below the sampler's own noise; more steps low
while the bit-operations exceed --bops-budget, relative to FP). The schedule lives in the exported TPQ rows
(quantizers/mixed_precision.py) and is recorded with its bit-operations in quant_config.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qdistill.data.model_folder import ModelFolderError, load_scheduler, load_unet, model_hash
from qdistill.data.trajectories import record_trajectories, seed_batches
from qdistill.export import ExportError, export_model
from qdistill.quantizers import NoiseCorrection, measure_noise_correction
from qdistill.quantizers.mixed_precision import StepBits, plan_step_bits, with_act_bits
from qdistill.trainer.checkpoint import META_FILE, CheckpointError, load_quantized


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder (holding quantized/) or a quantized folder")
    parser.add_argument("--out", required=True, help="the export folder to write")
    nc = parser.add_argument_group("PTQD noise correction (opt-in)")
    nc.add_argument("--noise-correction", action="store_true", help="measure and store PTQD's per-step statistics")
    nc.add_argument("--nc-samples", type=int, default=64, help="FP trajectories to measure on")
    nc.add_argument("--nc-steps", type=int, default=50, help="sampler steps of those trajectories (all are kept)")
    nc.add_argument("--nc-scheduler", choices=("ddim", "ddpm"), default="ddim")
    nc.add_argument("--nc-eta", type=float, default=0.0)
    nc.add_argument("--nc-seed", type=int, default=200_000,
                    help="trajectories use seeds seed, seed+1, ... (apart from calibration's and eval's)")
    nc.add_argument("--nc-batch-size", type=int, default=16)
    mp = parser.add_argument_group("PTQD step-aware mixed precision (opt-in; uses the --nc-* trajectories)")
    mp.add_argument("--mixed-precision", action="store_true", help="choose 8 or the model's activation bits per step")
    mp.add_argument("--bops-budget", type=float, default=None,
                    help="bit-operations of a sampling run relative to the FP model's (e.g. 0.025)")
    args = parser.parse_args(argv)
    for key in ("nc_samples", "nc_steps", "nc_batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    run = Path(args.run)
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
        extra = {"run": str(run)}
        correction = None
        if args.noise_correction or args.mixed_precision:
            records, scheduler = fp_trajectories(model, meta, args)
            measured_on = {"source_model": meta["source_model"], "samples": args.nc_samples, "steps": args.nc_steps,
                           "scheduler": args.nc_scheduler, "eta": args.nc_eta,
                           "seeds": [args.nc_seed, args.nc_seed + args.nc_samples], "model_mode": "simulated"}
            if args.mixed_precision:
                plan = mix_precision(model, meta, records, scheduler, args)
                extra["step_bits"] = {**plan.to_dict(), "measured_on": measured_on, "budget": args.bops_budget}
            if args.noise_correction:  # measured on the model as exported, mixed precision included
                correction = measure_run_noise(model, records)
                extra["noise_correction_measured_on"] = measured_on
        size = export_model(model, args.out, recipe=meta.get("recipe", "unknown"),
                            source_model=meta.get("source_model"), source_model_hash=meta.get("source_model_hash"),
                            scheduler_config=scheduler_config, noise_correction=correction, extra=extra)
    except (CheckpointError, ExportError, OSError, ValueError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    cfg = meta["quant_config"]
    print(f"[export] {meta.get('recipe')} W{cfg['weight_bits']}A{cfg['act_bits']} → {args.out}")
    print(f"[export] quantized layers: {size['quantized_layers_packed_bytes'] / 1024:.1f} KiB packed vs "
          f"{size['quantized_layers_fp32_bytes'] / 1024:.1f} KiB FP32 ({size['quantized_layers_ratio']:.3f}×); "
          f"file {size['file_bytes'] / 1024:.1f} KiB vs FP32 model {size['fp32_model_bytes'] / 1024:.1f} KiB")
    return 0


def fp_trajectories(model, meta: dict, args) -> tuple[list, object]:
    """FP sampler trajectories (every step kept) of the run's source model, and that sampler's scheduler."""
    if getattr(model.config, "cross_attention_dim", None):
        raise ExportError("--noise-correction and --mixed-precision support unconditional models only (the "
                          "trajectories hold no text conditioning)")
    if not meta.get("source_model"):
        raise ExportError("the run's quantized model records no source model; PTQD's measurements need the FP model")
    recorded_hash = meta.get("source_model_hash")
    if recorded_hash and model_hash(meta["source_model"]) != recorded_hash:
        raise ExportError(f"the source model {meta['source_model']} changed since the run (its hash differs from the "
                          "one the run recorded): its trajectories would not measure this quantized model")
    fp = load_unet(meta["source_model"]).eval()
    scheduler = load_scheduler(meta["source_model"], args.nc_scheduler)
    seeds = list(range(args.nc_seed, args.nc_seed + args.nc_samples))
    print(f"[export] PTQD: {args.nc_samples} FP trajectories of {meta['source_model']}, {args.nc_scheduler} "
          f"{args.nc_steps} steps eta={args.nc_eta}, all steps measured")
    records = [record for chunk in seed_batches(seeds, args.nc_batch_size)
               for record in record_trajectories(fp, scheduler, chunk, args.nc_steps, args.nc_batch_size, args.nc_eta,
                                                 keep_steps=None)[1]]
    return records, scheduler


def mix_precision(model, meta: dict, records: list, scheduler, args) -> StepBits:
    """Step-aware mixed precision between the model's activation bits and 8, applied to `model` in place."""
    low = meta["quant_config"]["act_bits"]
    if low >= 8:
        raise ExportError(f"--mixed-precision mixes the model's activation bits with 8; this model already uses {low}")
    high = with_act_bits(model, low, 8, ({"sample": r.sample, "timestep": r.timestep} for r in records))
    plan = plan_step_bits(model, high, scheduler, args.nc_steps, records, args.bops_budget, args.nc_eta)
    print(f"[export] step-aware mixed precision (A{low}/A8): {plan.bits.count(8)} of {len(plan.bits)} steps at 8 bits, "
          f"bit-operations {plan.relative_bops:.4f} of FP" +
          (f" (budget {args.bops_budget})" if args.bops_budget is not None else ""))
    print(f"[export] {'t':>6} {'bits':>5} {'noise ratio':>12}")
    for t, b, r in zip(plan.timesteps, plan.bits, plan.noise_ratio):
        print(f"[export] {t:6.0f} {b:5d} {r:12.3f}")
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
