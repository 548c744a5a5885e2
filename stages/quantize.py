"""quantize: post-training quantization (RTN with MSE ranges) of a model folder, judged against the FP model.

1. record FP sampler trajectories (the model inputs at every k-th step) as calibration data; a class-conditional
   model (the DiT bench teacher) samples each seed's label, seed mod classes, as `qdistill calibrate` does;
2. quantize_ a copy and fit_ranges_ its activation ranges on those inputs (no training);
3. save the quantized model (atomically) to OUT/quantized;
4. sample FP and quantized on the same seeds: PSNR, per-step noise-prediction MSE, OUT/metrics.json and the
   grid OUT/samples.png (FP | quantized).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import time
from pathlib import Path

import torch

from ..analysis.layer_choice import resolve_keep_sensitive
from ..configs import to_dict
from ..configs.schema import QuantizeRunConfig
from ..data.model_folder import load_denoiser, load_scheduler, model_hash
from ..denoisers import latent_name, model_kwargs, num_classes
from ..data.trajectories import class_conditioning, record_trajectories, uniform_steps
from ..devices import resolve_device
from ..errors import ModelFolderError
from ..evaluation.fidelity import save_grid
from ..evaluation.sampling import compare_to_fp
from ..export import save_quantized
from ..files import atomic_write_text
from ..quantizers import fit_ranges_, quantize_

logger = logging.getLogger(__name__)


def quantize(cfg: QuantizeRunConfig) -> dict:
    """Quantize `cfg.model` into `cfg.out`; returns the metrics written to OUT/metrics.json."""
    device = resolve_device(cfg.device)
    fp = load_denoiser(cfg.model).eval().to(device)
    calib_scheduler = load_scheduler(cfg.model, cfg.calibration.scheduler)
    eval_scheduler = load_scheduler(cfg.model, cfg.sampling.scheduler)
    needs = [p for p, v in inspect.signature(fp.forward).parameters.items()
             if v.default is inspect.Parameter.empty and p not in ("self", latent_name(fp), "timestep")]
    if needs:
        raise ModelFolderError(f"{cfg.model}: {type(fp).__name__} needs {needs}; `qdistill quantize` calibrates "
                               "unconditional and class-conditional models (use the Python API, quantize_ + "
                               "fit_ranges_, or qdistill calibrate + train, for text-conditional ones)")
    classes = num_classes(fp)
    cond_for = class_conditioning(fp)
    out = Path(cfg.out)
    torch.manual_seed(0)
    logger.info(f"{cfg.method}: {type(fp).__name__} from {cfg.model}, {cfg.quant.tag}, on {device}")

    # 1. calibration data: FP sampler inputs along whole trajectories
    c = cfg.calibration
    t0 = time.time()
    keep = uniform_steps(c.steps, c.every)
    _, records = record_trajectories(fp, calib_scheduler, range(c.seed, c.seed + c.num_samples), c.steps,
                                     c.batch_size, c.eta, keep, cond_for)
    logger.info(f"calibration: {c.num_samples} trajectories x {len(keep)} of {c.steps} {c.scheduler} steps "
                f"= {c.num_samples * len(keep)} inputs in {time.time() - t0:.1f}s")

    # 2. quantize (keep_sensitive=auto: the most sensitive layers chosen first) and calibrate activation ranges
    t0 = time.time()
    inputs = [{**model_kwargs(fp, r.sample, r.timestep), **(r.cond.model_kwargs() if r.cond else {})}
              for r in records]
    def measured():  # keep_sensitive_rows of the recorded rows, evenly strided
        rows = torch.cat([r.sample for r in records])
        t = torch.cat([r.timestep for r in records])
        labels = torch.cat([r.cond.class_labels for r in records]) if classes else None
        pick = torch.linspace(0, len(rows) - 1, min(cfg.quant.keep_sensitive_rows, len(rows))).round().long()
        return [{**model_kwargs(fp, rows[part], t[part]), **({"class_labels": labels[part]} if classes else {})}
                for part in pick.split(c.batch_size)]

    quant = resolve_keep_sensitive(fp, cfg.quant, lambda: inputs, measured, eval_scheduler.config.num_train_timesteps,
                                   record=out / "layer_selection.json", seed=0)
    cfg = dataclasses.replace(cfg, quant=quant)
    qunet = quantize_(copy.deepcopy(fp), quant)
    fit_ranges_(qunet, inputs)
    calib_seconds = time.time() - t0
    logger.info(f"quantized and calibrated in {calib_seconds:.1f}s")

    # 3. save
    save_quantized(qunet, out / "quantized", recipe=cfg.method, source_model=str(cfg.model),
                   source_model_hash=model_hash(cfg.model), run_config=to_dict(cfg))
    logger.info(f"saved {out / 'quantized'}")

    # 4. fidelity to FP on the same seeds
    s = cfg.sampling
    fp_final, q_final, fidelity = compare_to_fp(fp, qunet, eval_scheduler, range(s.seed, s.seed + s.num_samples),
                                                s.steps, s.batch_size, s.eta)
    metrics = {"recipe": cfg.method, "bits": cfg.quant.tag, "layer_bits": quant.layer_bits, **fidelity,
               "calibration_seconds": calib_seconds, "sampler": f"{s.scheduler} {s.steps} steps eta={s.eta}"}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    grid = save_grid([fp_final, q_final], out / "samples.png")
    logger.info(f"{metrics['bits']} {cfg.method} vs FP on {s.num_samples} seeds ({metrics['sampler']}): "
                f"PSNR {metrics['psnr_db']:.2f} dB, noise-prediction MSE {metrics['noise_pred_mse_mean']:.3e}")
    logger.info(f"wrote {out / 'metrics.json'} and {grid} (FP | quantized)")
    return metrics
