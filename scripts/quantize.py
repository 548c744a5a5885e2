"""Post-training quantization of a diffusers model folder, end to end, judged against the FP model.

    python scripts/quantize.py --config configs/rtn.yaml [key=value ...]

1. record FP sampler trajectories (the UNet inputs at every k-th step) as calibration data;
2. quantize_ the model and calibrate_ its activation ranges on those inputs (no training);
3. save the quantized state (atomically) to OUT/quantized;
4. sample FP and quantized on the same seeds; print PSNR and per-step noise-prediction MSE,
   write OUT/metrics.json and the grid OUT/samples.png (FP | quantized).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from qdistill.configs import ConfigError, load_config, to_dict
from qdistill.configs.schema import QuantizeRunConfig
from qdistill.data.model_folder import ModelFolderError, load_scheduler, load_unet, model_hash
from qdistill.data.trajectories import record_trajectories, uniform_steps
from qdistill.evaluation.fidelity import compare_to_fp, save_grid
from qdistill.quantizers import calibrate_, quantize_
from qdistill.trainer.checkpoint import atomic_write_text, save_quantized


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(QuantizeRunConfig, args.config, args.overrides)
        fp = load_unet(cfg.model).eval()
        calib_scheduler = load_scheduler(cfg.model, cfg.calibration.scheduler)
        eval_scheduler = load_scheduler(cfg.model, cfg.sampling.scheduler)
    except (ConfigError, ModelFolderError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    needs = [p for p, v in inspect.signature(fp.forward).parameters.items()
             if v.default is inspect.Parameter.empty and p not in ("self", "sample", "timestep")]
    if needs:
        print(f"qdistill: error: {cfg.model}: {type(fp).__name__} needs {needs}; scripts/quantize.py calibrates "
              "unconditional models (use the Python API, quantize_ + calibrate_, for conditional ones)", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    torch.manual_seed(0)
    print(f"[qdistill] {cfg.recipe}: {type(fp).__name__} from {cfg.model}, W{cfg.quant.weight_bits}A{cfg.quant.act_bits}")

    # 1. calibration data: FP sampler inputs along whole trajectories
    c = cfg.calibration
    t0 = time.time()
    keep = uniform_steps(c.num_steps, c.every)
    _, records = record_trajectories(fp, calib_scheduler, range(c.seed, c.seed + c.num_samples), c.num_steps,
                                     c.batch_size, c.eta, keep)
    print(f"[qdistill] calibration: {c.num_samples} trajectories x {len(keep)} of {c.num_steps} {c.scheduler} steps "
          f"= {c.num_samples * len(keep)} inputs in {time.time() - t0:.1f}s")

    # 2. quantize and calibrate activation ranges
    t0 = time.time()
    qunet = quantize_(copy.deepcopy(fp), cfg.quant)
    calibrate_(qunet, ({"sample": r.sample, "timestep": r.timestep} for r in records))
    calib_seconds = time.time() - t0
    print(f"[qdistill] quantized and calibrated in {calib_seconds:.1f}s")

    # 3. save
    save_quantized(qunet, out / "quantized", recipe=cfg.recipe, source_model=str(cfg.model),
                   source_model_hash=model_hash(cfg.model), run_config=to_dict(cfg))
    print(f"[qdistill] saved {out / 'quantized'}")

    # 4. fidelity to FP on the same seeds
    s = cfg.sampling
    fp_final, q_final, fidelity = compare_to_fp(fp, qunet, eval_scheduler, range(s.seed, s.seed + s.num_samples),
                                                s.num_steps, s.batch_size, s.eta)
    metrics = {
        "recipe": cfg.recipe,
        "bits": f"W{cfg.quant.weight_bits}A{cfg.quant.act_bits}",
        **fidelity,
        "calibration_seconds": calib_seconds,
        "sampler": f"{s.scheduler} {s.num_steps} steps eta={s.eta}",
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    grid = save_grid([fp_final, q_final], out / "samples.png")
    print(f"[qdistill] {metrics['bits']} {cfg.recipe} vs FP on {s.num_samples} seeds ({metrics['sampler']}): "
          f"PSNR {metrics['psnr_db']:.2f} dB, noise-prediction MSE {metrics['noise_pred_mse_mean']:.3e}")
    print(f"[qdistill] wrote {out / 'metrics.json'} and {grid} (FP | quantized)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
