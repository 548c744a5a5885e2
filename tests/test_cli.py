"""The `qdistill` command: `qdistill quantize` and `export` end to end on a model folder saved with
save_pretrained, --help of every subcommand, one-line errors with exit 2 (and tracebacks for bugs), installed
configs by name, and the marker that stops plain diffusers from loading a qdistill folder."""
import json

import pytest
import torch

from conftest import REPO, build_unet, example_inputs
from qdistill.cli import SUBCOMMANDS, config_keys
from qdistill.cli import main as qdistill
from qdistill.configs import ConfigError, load_config, resolve_config
from qdistill.configs.schema import QuantizeRunConfig
from qdistill.export import load_quantized

SMALL = ["calibration.num_samples=4", "calibration.steps=10", "calibration.every=2",
         "sampling.num_samples=4", "sampling.steps=10"]


def test_quantize_and_export_commands_on_a_saved_model_folder(demo_pipeline_dir, tmp_path, capsys):
    metrics = {}
    for bits in (8, 4):
        out = tmp_path / f"w{bits}"
        rc = qdistill(["quantize", "--config", "rtn", f"model={demo_pipeline_dir}",
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

    # `qdistill export` on the RTN run: the export reloads to the same outputs, with its scheduler
    from qdistill.export import load_exported

    for bits in (8, 4):
        assert qdistill(["export", "--run", str(tmp_path / f"w{bits}"), f"out={tmp_path / f'e{bits}'}"]) == 0
    assert "quantized layers" in capsys.readouterr().out
    kw = example_inputs(build_unet("attn-lpb1"), seed=3)
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "e8")(**kw).sample, reloaded(**kw).sample)
    assert (tmp_path / "e8" / "scheduler_config.json").is_file()
    assert (tmp_path / "e4" / "model.safetensors").stat().st_size < (tmp_path / "e8" / "model.safetensors").stat().st_size
    assert qdistill(["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
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
    rc = qdistill(["quantize", "--config", "rtn", f"out={tmp_path / 'out'}", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = qdistill(["quantize", "--config", str(REPO / "configs/rtn.yaml"), f"model={tmp_path / 'empty'}"])
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


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_help_lists_its_config_keys(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        qdistill([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    keys = config_keys(SUBCOMMANDS[command][0])
    assert len(keys) >= 5
    for key, type_name, default, _ in keys:  # every key, with its type and default, on its own line
        assert any(line.split()[:1] == [key] and type_name in line and f"= {default}" in line
                   for line in out.splitlines()), key


@pytest.mark.parametrize("argv,expected", [
    (["train", "distill.bogus=1"], "unknown config key 'distill.bogus'"),
    (["calibrate", "model=/nonexistent/folder", "out=OUT"], "model folder not found: /nonexistent/folder"),
    (["train", "quant.act_bits=9"], "act_bits must be an integer in 2..8"),
    (["export", "run=/nonexistent/run", "out=OUT"], "holds no quantized model"),
    (["eval", "model=/nonexistent/export", "out=OUT"], "export folder /nonexistent/export lacks"),
    (["train", "--config", "no-such-config"], "nor an installed config"),
    (["train", "--config", "teacher"], "(now bench/teacher)"),
    (["calibrate", "num_steps=5", "out=OUT"], "config key 'num_steps' was renamed 'steps'"),
    (["quantize", "sampling.num_steps=5", "out=OUT"], "config key 'sampling.num_steps' was renamed 'sampling.steps'"),
    (["export", "measure.samples=5", "run=OUT"], "config key 'measure.samples' was renamed 'measure.num_samples'"),
    (["train", "recipe=qdiffusion", "out=OUT"], "config key 'recipe' was renamed 'method'"),
    (["calibrate", "model=bench/teacher", "out=OUT"], "bench/teacher: the shipped folder is now assets/teacher"),
    (["benchmark", "recipes=[rtn]"], "python -m qdistill.bench.benchmark --config bench/benchmark"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv, expected, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert qdistill(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdistill: error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    """A bug is not a user error: it propagates (the interpreter prints its traceback), not `exit 2`."""
    from qdistill import stages

    def broken(cfg):
        raise KeyError("a bug inside a stage")

    monkeypatch.setitem(stages.STAGES, "quantize", broken)
    with pytest.raises(KeyError, match="a bug inside a stage"):
        qdistill(["quantize"])


def test_configs_resolve_by_name_and_are_listed(capsys):
    from qdistill.configs.schema import TrainConfig

    by_name = load_config(TrainConfig, "dilatequant", ["distill.iterations=7"])
    by_path = load_config(TrainConfig, REPO / "configs" / "dilatequant.yaml", ["distill.iterations=7"])
    assert by_name == by_path and by_name.distill.iterations == 7 and by_name.quant.act_bits == 4
    assert qdistill(["configs"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"calibrate", "rtn", "demo", "dilatequant", "qdiffusion", "ptqd", "dilatequant+ptqd", "eval"} <= set(listed)
    # the bench tooling's configs are listed apart, after the ones a user runs, and resolve by their bench/ name
    bench = listed.index("bench/benchmark")
    assert {"bench/benchmark", "bench/benchmark_dit", "bench/teacher", "bench/dit_teacher",
            "bench/classifier"} == set(listed[bench:]) and "benchmark" not in listed
    assert resolve_config("bench/benchmark") == REPO / "configs" / "bench" / "benchmark.yaml"


def test_the_benchmark_harness_refuses_a_bad_key_in_one_line(capsys):
    from qdistill.bench.benchmark import main as benchmark

    assert benchmark(["recipes=[nope]"]) == 2
    err = capsys.readouterr().err
    assert "config key 'recipes[0]'" in err and err.count("\n") == 1, err


def test_plain_diffusers_refuses_qdistill_folders_and_points_to_the_loaders(tmp_path):
    """A saved quantized folder and an export carry a `quantization_config` marker in config.json: diffusers'
    from_pretrained stops with qdistill's loader in its message (instead of loading random weights)."""
    from diffusers import UNet2DModel

    from qdistill.export import export_model, load_exported, save_quantized
    from qdistill.quantizers import QuantConfig, fit_ranges_, quantize_

    unet = build_unet("plain-lpb2")
    kw = example_inputs(unet)
    q = fit_ranges_(quantize_(unet, QuantConfig(weight_bits=8, act_bits=8)), [kw])
    save_quantized(q, tmp_path / "quantized", recipe="test")
    export_model(q, tmp_path / "export", recipe="test")
    for folder, loader in (("quantized", "qdistill.export.load_quantized"), ("export", "qdistill.export.load_exported")):
        with pytest.raises(ValueError, match=loader.replace(".", r"\.")):
            UNet2DModel.from_pretrained(tmp_path / folder)
    with torch.no_grad():  # qdistill's own loaders read them back
        assert torch.equal(load_quantized(tmp_path / "quantized")(**kw).sample, q(**kw).sample)
        assert torch.equal(load_exported(tmp_path / "export")(**kw).sample, q(**kw).sample)
