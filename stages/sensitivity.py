"""sensitivity: which quantized layers cost the most, on the model's own calibration rows.

1. load the FP model and the calibration shards (recorded by `qdistill calibrate` from it);
2. the quantized model: a trained one (`quantized=RUN`), or RTN per `quant.*` (quantize_ a copy, activation ranges
   from `init_rows` rows);
3. for every quantized layer and attention processor, the noise-prediction MSE against FP with only it quantized
   and with only it left in FP, over `rows` rows, overall and per timestep bucket (analysis/sensitivity.py);
4. OUT/sensitivity.json (everything), OUT/sensitivity.md (the sorted table), OUT/sensitivity.png (a bar chart of
   the top units), TensorBoard in OUT/tb (table and chart); the top rows are printed.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from ..analysis.layer_choice import resolve_keep_sensitive
from ..analysis.sensitivity import chart_array, layer_sensitivity, sensitivity_chart, sensitivity_table
from ..configs import to_dict
from ..configs.schema import SensitivityConfig
from ..data.calibration_set import load_shard_list, read_manifest, strided_batches
from ..data.model_folder import load_denoiser, load_scheduler, model_hash
from ..devices import resolve_device
from ..errors import CheckpointError
from ..export.quantized import load_quantized, quantized_folder, read_quantized_meta
from ..files import atomic_write_text
from ..quantizers import fit_ranges_, quantize_

logger = logging.getLogger(__name__)


def sensitivity(cfg: SensitivityConfig) -> dict:
    """Measure `cfg`'s report, write it to `cfg.out` and return it."""
    device = resolve_device(cfg.device)
    # 1. the FP model and its calibration rows
    fp = load_denoiser(cfg.model).eval().to(device)
    source_hash = model_hash(cfg.model)
    manifest = read_manifest(cfg.trajectories)
    shards = load_shard_list(cfg.trajectories, source_hash)
    dtype = next(fp.parameters()).dtype

    # 2. the quantized model
    if cfg.quantized:
        qdir = quantized_folder(cfg.quantized)
        recorded = read_quantized_meta(qdir).get("source_model_hash")
        if recorded and recorded != source_hash:
            raise CheckpointError(f"{qdir} was quantized from another model than {cfg.model} (its recorded hash "
                                  f"{recorded[:12]} differs from {source_hash[:12]})")
        model = load_quantized(qdir, device=device)
        what = f"{qdir} ({model.qdistill_config.tag}, trained)"
    else:
        rows = lambda n: strided_batches(shards, n, cfg.batch_size, device, dtype, fp)  # noqa: E731
        quant = resolve_keep_sensitive(fp, cfg.quant, lambda: rows(cfg.init_rows),  # the model selection makes
                                       lambda: rows(cfg.quant.keep_sensitive_rows),
                                       load_scheduler(cfg.model).config.num_train_timesteps, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        model = quantize_(copy.deepcopy(fp), quant)
        fit_ranges_(model, strided_batches(shards, cfg.init_rows, cfg.batch_size, device, dtype, fp))
        what = f"RTN {quant.tag} ({quant.act_init} activation ranges from {cfg.init_rows} rows)" + (
            f", {len(quant.layer_bits)} layer_bits entries" if quant.layer_bits else "")
    model.eval()
    logger.info(f"{type(fp).__name__} from {cfg.model}, {what}, on {device}; {manifest['num_rows']} calibration rows")

    # 3. the errors
    batches = list(strided_batches(shards, cfg.rows, cfg.batch_size, device, dtype, fp))
    timesteps = load_scheduler(cfg.model).config.num_train_timesteps
    report = layer_sensitivity(fp, model, batches, cfg.buckets, timesteps)
    report = {"model": str(cfg.model), "quantized": what, "bits": model.qdistill_config.tag, **report,
              "config": to_dict(cfg)}

    # 4. the report
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sensitivity.json", json.dumps(report, indent=2))
    table = sensitivity_table(report)
    atomic_write_text(out / "sensitivity.md", f"# Sensitivity: {what}\n\n{table}\n")
    chart = sensitivity_chart(report, out / "sensitivity.png", cfg.top)
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when writing

    with SummaryWriter(str(out / "tb")) as writer:
        writer.add_text("sensitivity", table)
        writer.add_image("sensitivity", chart_array(chart), dataformats="HWC")
        for b, value in enumerate(report["full"]["by_bucket"]):
            if value is not None:
                writer.add_scalar("sensitivity/full_model_mse_by_bucket", value, b)
    logger.info(f"the {min(cfg.top, len(report['units']))} most sensitive of {len(report['units'])} units:\n"
                f"{sensitivity_table(report, cfg.top)}")
    logger.info(f"wrote {out / 'sensitivity.json'}, {out / 'sensitivity.md'}, {chart} and {out / 'tb'}")
    return report
