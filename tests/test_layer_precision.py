"""Per-layer precision (quantizers/layer_precision.py): `quant.layer_bits` patterns build the layers they name at
their bits (FP layers stay plain float layers), exports rebuild them, integer mode runs them; keep_sensitive=auto
keeps the layer that costs the most within its bit-operation budget, and the stages record the choice."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import calibration_batches, example_inputs, make_tiny_bench, rel_err, tiny_unet
from torch import nn

from qdistill.cli import main as qdistill
from qdistill.configs import ConfigError, load_config
from qdistill.configs.schema import TrainConfig
from qdistill.export import export_model, load_exported, load_quantized
from qdistill.quantizers import QUANT_LAYERS, QuantConfig, fit_ranges_, quantize_
from qdistill.quantizers.integer_kernels import saturation_reason
from qdistill.analysis.layer_choice import select_sensitive_layers
from qdistill.cost import layer_macs, rule_bit_operations
from qdistill.quantizers.layer_precision import assign_layer_bits

COARSE = "up_blocks.1.resnets.0.conv1"  # a middle layer of tiny_unet


@pytest.fixture(scope="module")
def fp():
    return tiny_unet()


def specs(model) -> dict:
    return {n: (m.spec.weight_bits, m.spec.act_bits) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def test_patterns_set_bits_fp_and_the_last_match_wins(fp):
    config = QuantConfig(weight_bits=4, act_bits=4, layer_bits={
        "conv_in": "fp",  # exact name
        "up_blocks.1": 8,  # the module's layers
        "up_blocks.1.resnets.*.conv2": "W4A8",  # a glob, after the line above: it wins
        "time_embedding": None})
    q = quantize_(copy.deepcopy(fp), config)
    bits = specs(q)
    assert type(q.conv_in) is nn.Conv2d and "conv_in" not in bits
    assert not any(n.startswith("time_embedding.") for n in bits)
    assert bits["up_blocks.1.resnets.0.conv1"] == (8, 8)
    assert bits["up_blocks.1.resnets.0.conv2"] == (4, 8)
    assert bits["down_blocks.0.resnets.0.conv1"] == (4, 4)
    assert bits["conv_out"] == (8, 8)  # first_last_bits still rules what no pattern names
    assert assign_layer_bits(fp, config)["conv_in"] is None
    x = example_inputs(fp, batch=2)
    with torch.no_grad():
        assert torch.isfinite(q(**x).sample).all()


def test_bad_patterns_and_values_are_named(fp):
    with pytest.raises(ValueError, match="'up_blocks.9' matches no Conv2d/Linear layer"):
        quantize_(copy.deepcopy(fp), QuantConfig(layer_bits={"up_blocks.9": 8}))
    with pytest.raises(ValueError, match=r"layer_bits\['conv_in'\]: 'W4' is not bits"):
        QuantConfig(layer_bits={"conv_in": "W4"})
    with pytest.raises(ConfigError, match="layer_bits"):
        load_config(TrainConfig, None, ["quant.layer_bits=[conv_in]"])
    cfg = load_config(TrainConfig, None, ["quant.layer_bits={conv_in: fp, 'up_blocks.1': W8A8, conv_out: 8}",
                                          "quant.keep_sensitive_bits=[fp, W8A8]"])
    assert cfg.quant.layer_bits == {"conv_in": "fp", "up_blocks.1": "W8A8", "conv_out": 8}
    with pytest.raises(ValueError, match="keep_sensitive=auto is chosen from data"):
        quantize_(copy.deepcopy(fp), QuantConfig(keep_sensitive="auto"))


@pytest.mark.skipif(saturation_reason() is not None, reason=str(saturation_reason()))
def test_mixed_layers_export_exactly_and_run_on_integer_kernels(fp, tmp_path):
    config = QuantConfig(weight_bits=4, act_bits=4, layer_bits={"conv_in": "fp", COARSE: "W8A8"})
    q = fit_ranges_(quantize_(copy.deepcopy(fp), config), calibration_batches(fp))
    export_model(q, tmp_path / "export", recipe="test")
    sim, integer = load_exported(tmp_path / "export", "simulated"), load_exported(tmp_path / "export", "integer")
    assert specs(sim) == specs(q) and type(sim.conv_in) is nn.Conv2d
    assert sim.qdistill_config.layer_bits == config.layer_bits  # recorded in the export
    x = example_inputs(fp, batch=4, timesteps=[999, 600, 250, 0])
    with torch.no_grad():
        y_q, y_sim, y_int = q(**x).sample, sim(**x).sample, integer(**x).sample
    assert torch.equal(y_sim, y_q)
    assert rel_err(y_int, y_sim) < 2e-2  # test_export's end-to-end bound at W4A4


def test_auto_keeps_the_costliest_layer_within_the_budget(fp):
    """A layer at 2 bits among 8-bit ones causes most of the error: auto keeps it (FP if that fits, else
    8 bits) and stays within the budget; a zero budget keeps nothing."""
    base = QuantConfig(weight_bits=8, act_bits=8, layer_bits={COARSE: 2}, keep_sensitive="auto",
                       keep_sensitive_budget=0.5, keep_sensitive_bits=["fp", 8])
    init, rows = calibration_batches(fp, batches=4), calibration_batches(fp, batches=2, batch=8)
    torch.manual_seed(0)
    resolved, report = select_sensitive_layers(fp, base, init, rows, show_progress=False)
    assert resolved.keep_sensitive == "off" and report["layers"][0]["name"] == COARSE
    assert resolved.layer_bits[COARSE] in ("fp", "W8A8")
    assert 0 < report["extra_bops"] <= 0.5
    macs = layer_macs(fp, rows[0])
    rules = assign_layer_bits(fp, QuantConfig(weight_bits=8, act_bits=8, layer_bits={COARSE: 2}))
    assert rule_bit_operations(macs, assign_layer_bits(fp, resolved)) == pytest.approx(
        rule_bit_operations(macs, rules) * (1 + report["extra_bops"]))
    q = fit_ranges_(quantize_(copy.deepcopy(fp), resolved), init)
    assert specs(q).get(COARSE, None) in (None, (8, 8))
    nothing, report0 = select_sensitive_layers(fp, dataclasses.replace(base, keep_sensitive_budget=0.0), init, rows,
                                               show_progress=False)
    assert report0["layers"] == [] and nothing.layer_bits == {COARSE: 2}


def test_stages_record_the_choice(tmp_path):
    """`qdistill quantize` and `qdistill train` with keep_sensitive=auto: layer_selection.json, the chosen layers in
    metrics.json and in the saved model's config (so it reloads with them); a resumed train reads the record."""
    bench = make_tiny_bench(tmp_path, num_samples=4, batch_size=2)
    auto = ["quant.keep_sensitive=auto", "quant.keep_sensitive_budget=0.1", "quant.keep_sensitive_rows=8"]
    rc = qdistill(["quantize", "--config", "rtn", f"model={bench / 'model'}", f"out={tmp_path / 'rtn'}", *auto,
                   "calibration.num_samples=2", "calibration.steps=4", "calibration.every=2",
                   "sampling.num_samples=2", "sampling.steps=2"])
    assert rc == 0
    chosen = json.loads((tmp_path / "rtn" / "layer_selection.json").read_text())["layer_bits"]
    assert chosen and chosen == json.loads((tmp_path / "rtn" / "metrics.json").read_text())["layer_bits"]
    assert load_quantized(tmp_path / "rtn" / "quantized").qdistill_config.layer_bits == chosen

    out = tmp_path / "run"
    args = [f"model={bench / 'model'}", f"trajectories={bench / 'traj'}", f"out={out}", *auto,
            "distill.iterations=2", "distill.batch_size=2", "distill.init_rows=8", "distill.checkpoint_every=0",
            "distill.max_blocks=2", "sampling.num_samples=2", "sampling.steps=2", "threads=1"]
    from conftest import train_in_process
    rc, log = train_in_process(args)
    assert rc == 0, log
    record = json.loads((out / "layer_selection.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert record["layer_bits"] == metrics["layer_bits"] and "keep_sensitive:" in log
    model = load_quantized(out / "quantized")
    assert model.qdistill_config.layer_bits == record["layer_bits"]
    # the resumed run keeps the recorded choice, even when a new measurement would differ
    record["layer_bits"] = {"conv_in": "fp"}
    (out / "layer_selection.json").write_text(json.dumps(record))
    rc, log = train_in_process(args)
    assert rc == 2 and "quant.layer_bits" in log  # the checkpoint's layers differ from the record's: refused
