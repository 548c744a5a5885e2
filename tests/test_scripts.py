"""scripts/quantize.py end to end on a model folder saved with save_pretrained, and its bad-input errors."""
import json

import pytest
import torch

from conftest import REPO, build_unet, example_inputs, load_script
from qdistill.configs import ConfigError, load_config
from qdistill.configs.schema import QuantizeRunConfig
from qdistill.trainer.checkpoint import load_quantized

quantize_script = load_script("quantize")
SMALL = ["calibration.num_samples=4", "calibration.num_steps=10", "calibration.every=2",
         "sampling.num_samples=4", "sampling.num_steps=10"]


def test_quantize_script_on_a_saved_model_folder(demo_pipeline_dir, tmp_path, capsys):
    metrics = {}
    for bits in (8, 4):
        out = tmp_path / f"w{bits}"
        rc = quantize_script.main(["--config", str(REPO / "configs/rtn.yaml"), f"model={demo_pipeline_dir}",
                                   f"out={out}", f"quant.weight_bits={bits}", f"quant.act_bits={bits}", *SMALL])
        assert rc == 0
        metrics[bits] = json.loads((out / "metrics.json").read_text())
        assert metrics[bits]["bits"] == f"W{bits}A{bits}" and len(metrics[bits]["noise_pred_mse_per_step"]) == 10
        assert (out / "samples.png").stat().st_size > 0
    # a random-weight model amplifies errors along the trajectory, so only the ordering is asserted here
    assert metrics[8]["psnr_db"] > metrics[4]["psnr_db"]
    assert metrics[8]["noise_pred_mse_mean"] < 0.1 * metrics[4]["noise_pred_mse_mean"]
    meta = json.loads((tmp_path / "w8" / "quantized" / "quant_config.json").read_text())
    assert meta["recipe"] == "rtn" and len(meta["source_model_hash"]) == 64
    reloaded = load_quantized(tmp_path / "w8" / "quantized")
    with torch.no_grad():
        assert torch.isfinite(reloaded(**example_inputs(build_unet("attn-lpb1"))).sample).all()
    assert "PSNR" in capsys.readouterr().out

    # scripts/export.py on the RTN run: the export reloads to the same outputs, with its scheduler
    from qdistill.export import load_exported

    for bits in (8, 4):
        assert load_script("export").main(["--run", str(tmp_path / f"w{bits}"), "--out", str(tmp_path / f"e{bits}")]) == 0
    assert "quantized layers" in capsys.readouterr().out
    kw = example_inputs(build_unet("attn-lpb1"), seed=3)
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "e8")(**kw).sample, reloaded(**kw).sample)
    assert (tmp_path / "e8" / "scheduler_config.json").is_file()
    assert (tmp_path / "e4" / "model.safetensors").stat().st_size < (tmp_path / "e8" / "model.safetensors").stat().st_size
    assert load_script("export").main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "holds no quantized model" in capsys.readouterr().err


@pytest.mark.parametrize("override,expected", [
    ("quant.bogus=1", "unknown config key 'quant.bogus'"),
    ("quant.weight_bits=9", "weight_bits must be an integer in 2..8"),
    ("quant.act_bits=1", "act_bits must be an integer in 2..8"),
    ("quant.weight_bits=four", "config key 'quant.weight_bits': 'four' is not a int"),
    ("calibration.scheduler=euler", "config key 'calibration.scheduler'"),
    ("model=/nonexistent/model", "model folder not found: /nonexistent/model"),
])
def test_bad_input_gives_a_one_line_error(override, expected, capsys, tmp_path):
    rc = quantize_script.main(["--config", str(REPO / "configs/rtn.yaml"), f"out={tmp_path / 'out'}", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = quantize_script.main(["--config", str(REPO / "configs/rtn.yaml"), f"model={tmp_path / 'empty'}"])
    assert rc == 2 and "is not a diffusers model folder" in capsys.readouterr().err


def test_config_overrides_and_types(tmp_path):
    cfg = load_config(QuantizeRunConfig, REPO / "configs/rtn.yaml", ["quant.first_last_bits=null", "sampling.eta=1"])
    assert cfg.quant.first_last_bits is None and cfg.sampling.eta == 1.0 and isinstance(cfg.sampling.eta, float)
    assert cfg.quant.per_timestep is False  # from the YAML
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(QuantizeRunConfig, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("quant: [1, 2]\n")
    with pytest.raises(ConfigError, match="'quant' must be a section"):
        load_config(QuantizeRunConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(QuantizeRunConfig, None, ["quant.weight_bits"])
