"""Per-layer sensitivity (analysis/sensitivity.py, `qdistill sensitivity`): the ranking finds a layer made
coarse on purpose, the single-layer errors add up to the whole model's at 8 bits, the model is left as found,
and the stage writes its JSON, table, chart and TensorBoard events."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import calibration_batches, make_tiny_bench, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler

from qdistill.cli import main as qdistill
from qdistill.analysis.sensitivity import layer_sensitivity, quantization_units, sensitivity_table
from qdistill.quantizers import QuantConfig, fit_ranges_, quantize_

COARSE = "up_blocks.1.resnets.0.conv1"  # a middle layer of tiny_unet, set to 2-bit weights below


def quantized(fp, bits: int):
    torch.manual_seed(0)
    model = quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=bits, act_bits=bits))
    return fit_ranges_(model, calibration_batches(fp, batches=4))


@pytest.fixture(scope="module")
def fp():
    return tiny_unet()


@pytest.fixture(scope="module")
def rows(fp):
    return calibration_batches(fp, batches=3, batch=8)


def test_units_cover_every_quantized_layer_and_attention(fp):
    units = quantization_units(quantized(fp, 8))
    kinds = {u.kind for u in units}
    assert kinds == {"layer", "attention"}
    names = [u.name for u in units]
    assert len(names) == len(set(names))
    assert all(len(u.quantizers) >= 2 for u in units)  # a layer's weight and input; attention's four


def test_a_coarse_layer_ranks_first(fp, rows):
    model = quantized(fp, 8)
    layer = model.get_submodule(COARSE)
    for q, (a, b) in zip(layer.weight_quantizers, layer.input_groups):
        q.bits = 2
        q.init_range(layer.weight[:, a:b], "mse")
    report = layer_sensitivity(fp, model, rows, show_progress=False)
    first = report["units"][0]
    assert first["name"] == COARSE
    assert first["share"] > 0.5  # a 2-bit layer among 8-bit ones dominates
    assert max(report["units"], key=lambda r: r["saving"])["name"] == COARSE


def test_single_layer_errors_add_up_to_the_whole_model_at_8_bits(fp, rows):
    """Small errors are close to additive: the sum of the only-quantized errors is within 25 % of the whole
    model's (measured: a few %); the report's per-bucket means average back to the overall mean."""
    report = layer_sensitivity(fp, quantized(fp, 8), rows, show_progress=False)
    full = report["full"]["mse"]
    assert 0.75 < report["sum_only_quantized_mse"] / full < 1.25
    counts = torch.zeros(4)
    for kw in rows:
        counts += torch.bincount((kw["timestep"] // 250).long().clamp(max=3), minlength=4)
    by_bucket = torch.tensor(report["full"]["by_bucket"])
    assert (by_bucket * counts).sum() / counts.sum() == pytest.approx(full, rel=1e-6)
    assert all(r["only_fp"]["mse"] <= full * 1.05 for r in report["units"])  # leaving a layer in FP never hurts much


def test_the_model_is_left_as_found(fp, rows):
    model = quantized(fp, 4)
    off = model.get_submodule(COARSE).input_quantizers[0]
    off.enabled = False  # one quantizer the caller had switched off
    before = model(**rows[0]).sample
    layer_sensitivity(fp, model, rows[:1], show_progress=False)
    assert off.enabled is False
    assert torch.equal(model(**rows[0]).sample, before)


def test_errors_are_clear(fp, rows):
    with pytest.raises(ValueError, match="at least one batch"):
        layer_sensitivity(fp, quantized(fp, 8), [], show_progress=False)
    with pytest.raises(ValueError, match="no quantized layers"):
        layer_sensitivity(fp, copy.deepcopy(fp), rows, show_progress=False)


def test_stage_writes_json_table_chart_and_tensorboard(tmp_path, capsys):
    bench = make_tiny_bench(tmp_path, num_samples=4, batch_size=2)
    out = tmp_path / "sens"
    rc = qdistill(["sensitivity", f"model={bench / 'model'}", f"trajectories={bench / 'traj'}", f"out={out}",
                   "quant.weight_bits=4", "quant.act_bits=4", "rows=16", "init_rows=16", "top=5"])
    assert rc == 0
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["bits"] == "W4A4" and report["rows"] == 16
    mses = [r["only_quantized"]["mse"] for r in report["units"]]
    assert mses == sorted(mses, reverse=True) and mses[0] > 0
    assert (out / "sensitivity.md").read_text().count("\n| ") == len(report["units"]) + 1  # header + all units
    from PIL import Image
    assert Image.open(out / "sensitivity.png").size[1] > 5 * 16
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb")).Reload()
    assert "sensitivity" in events.Tags()["images"]
    assert "sensitivity/full_model_mse_by_bucket" in events.Tags()["scalars"]
    assert report["units"][0]["name"] in capsys.readouterr().out  # the printed top rows
    # a trained model from another source is refused by name
    other = tiny_unet()
    with torch.no_grad():
        other.conv_in.bias.add_(1.0)
    DDPMPipeline(unet=other, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "other")
    rc = qdistill(["quantize", "--config", "rtn", f"model={tmp_path / 'other'}", f"out={tmp_path / 'rtn'}",
                   "calibration.num_samples=2", "calibration.steps=4", "calibration.every=2",
                   "sampling.num_samples=2", "sampling.steps=2"])
    assert rc == 0
    capsys.readouterr()
    rc = qdistill(["sensitivity", f"model={bench / 'model'}", f"trajectories={bench / 'traj'}", f"out={out}",
                   f"quantized={tmp_path / 'rtn'}"])
    assert rc == 2 and "quantized from another model" in capsys.readouterr().err


def test_table_lists_the_top_units(fp, rows):
    report = layer_sensitivity(fp, quantized(fp, 4), rows[:1], show_progress=False)
    table = sensitivity_table(report, top=3)
    assert table.count(f"`{report['units'][0]['name']}`") == 1 and table.count("\n| ") == 3  # the 3 rows under the header
