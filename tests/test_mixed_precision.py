"""PTQD's step-aware mixed precision: the schedule respects its budget, lives in the TPQ rows and in second
weight copies, and sampling runs every step at its own bits (simulated, exported and on integer kernels)."""
import copy
import random
import warnings

import pytest
import torch
from diffusers import DDIMScheduler

from conftest import build_unet, calibration_batches
from qdistill.data.trajectories import run_sampler
from qdistill.export import export_model, load_exported
from qdistill.quantizers import QUANT_LAYERS, QuantConfig, fit_ranges_, dilate_weight, quantize_
from qdistill.quantizers.integer_kernels import unavailable_reason
from qdistill.cost import layer_macs
from qdistill.quantizers.mixed_precision import (apply_step_bits, bit_operations, choose_high_steps, with_act_bits,
                                                 with_weight_bits)
from qdistill.quantizers.temporal import TemporalQuantizer

STEPS = 6


def test_choose_high_steps_threshold_then_budget():
    ratio = [3.0, 0.2, 1.5, 0.9, 2.0, 0.5]
    low, high = [1.0] * 6, [4.0] * 6
    # no budget: high precision exactly where the low-precision noise exceeds the sampler's
    H, L = True, False
    assert choose_high_steps(ratio, low, high, None) == [H, L, H, L, H, L]
    # the noise rule costs 3·1 + 3·4 = 15; a budget of 12 sends the smallest-ratio high step (1.5) low
    assert choose_high_steps(ratio, low, high, 12.0) == [H, L, L, L, H, L]
    assert choose_high_steps(ratio, low, high, 15.0) == [H, L, H, L, H, L]  # already within budget
    with pytest.raises(ValueError, match="below the cost of running every step at low precision"):
        choose_high_steps(ratio, low, high, 5.0)


def test_choose_high_steps_never_exceeds_budget():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        ratio = [rng.uniform(0, 3) for _ in range(n)]
        lo = [rng.uniform(0.5, 1.0) for _ in range(n)]
        hi = [x * rng.uniform(1.5, 4.0) for x in lo]
        budget = rng.uniform(sum(lo), sum(hi) * 1.1)
        high = choose_high_steps(ratio, lo, hi, budget)
        assert sum(c if h else a for h, a, c in zip(high, lo, hi)) <= budget + 1e-9
        # every step under the noise rule stays low; a step the budget sent low has a smaller ratio than
        # every step left high
        assert not any(h for h, r in zip(high, ratio) if r <= 1)
        forced = [r for h, r in zip(high, ratio) if not h and r > 1]
        kept = [r for h, r in zip(high, ratio) if h]
        assert not forced or not kept or max(forced) <= min(kept)


# (low model bits, what the high model switches): activations only, weights and activations (weights from the
# FP model), weights only
CASES = {"A4/A8": ((8, 4), "act"), "W4A4/W8A8": ((4, 4), "both"), "W4A8/W8A8": ((4, 8), "weights")}


@pytest.fixture(scope="module", params=list(CASES))
def mixed(request):
    """A tiny UNet quantized at the low bits and calibrated on the DDIM steps, its high-precision twin, and the
    mix on an alternating schedule."""
    (wb, ab), switch = CASES[request.param]
    fp = build_unet("attn-lpb1")
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    timesteps = [float(t) for t in scheduler.timesteps]
    batches = calibration_batches(fp, timesteps=timesteps, batches=3)
    low = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=wb, act_bits=ab)), batches)
    high = low
    if switch in ("weights", "both"):
        high = with_weight_bits(high, 4, 8, fp)
    if switch in ("act", "both"):
        high = with_act_bits(high, 4, 8, batches)
    use_high = [False, True] * (STEPS // 2)
    mix = apply_step_bits(copy.deepcopy(low), high, timesteps, use_high)
    return fp, scheduler, timesteps, low, high, use_high, mix, switch


def test_mixed_model_runs_each_step_at_its_bits(mixed):
    fp, scheduler, timesteps, low, high, use_high, mix, switch = mixed
    x = torch.randn(2, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size,
                    generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t, h in zip(timesteps, use_high):
            out = mix(x, torch.tensor(t)).sample
            assert torch.equal(out, (high if h else low)(x, torch.tensor(t)).sample), f"timestep {t} (high: {h})"
            assert not torch.equal(out, (low if h else high)(x, torch.tensor(t)).sample)
        # a batch that mixes steps: each sample gets its own step's weights and activation rows (compared with
        # the same batch through the low and the high model: a batch of another size may flip a rounding tie)
        ts = torch.tensor(timesteps[:2])
        both = mix(x, ts).sample
        for i in range(2):
            assert torch.equal(both[i], (high if use_high[i] else low)(x, ts).sample[i])
    # 8-bit activations where the first and last convs were already: those tables are untouched
    switched = [q for q in mix.modules() if isinstance(q, TemporalQuantizer) and q._mixed_bits]
    assert bool(switched) == (switch != "weights")
    assert all(q.row_bits.tolist() == [8 if h else 4 for h in use_high] for q in switched)
    copies = [m.step_weights for m in mix.modules() if isinstance(m, QUANT_LAYERS) and m.step_weights is not None]
    assert bool(copies) == (switch != "act")
    assert all(c.bits == 8 and c.use.tolist() == use_high for c in copies)


def test_sampling_switches_bits_per_step(mixed):
    """A whole DDIM run of the mixed model equals a run that calls the low or high model by the schedule."""
    fp, scheduler, timesteps, low, high, use_high, mix, switch = mixed
    noise = torch.randn(2, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size,
                        generator=torch.Generator().manual_seed(6))
    by_t = dict(zip(timesteps, use_high))

    class Switch(torch.nn.Module):  # what the schedule means, written out
        config = fp.config

        def forward(self, sample, timestep):  # called by name, as every diffusers denoiser
            return (high if by_t[float(timestep.reshape(-1)[0])] else low)(sample, timestep)

    a = run_sampler(mix, scheduler, noise, STEPS)
    b = run_sampler(Switch(), scheduler, noise, STEPS)
    assert torch.equal(a, b)


def test_schedule_survives_export_and_runs_on_integer_kernels(mixed, tmp_path):
    import json

    fp, scheduler, timesteps, low, high, use_high, mix, switch = mixed
    size = export_model(mix, tmp_path / "mix", recipe="rtn+mixed")
    meta = json.loads((tmp_path / "mix" / "quant_config.json").read_text())
    # a second weight copy is packed (8-bit codes: one byte per weight) and makes the export format 2
    assert meta["format_version"] == (1 if switch == "act" else 2)
    with_copy = {n: m for n, m in mix.named_modules() if isinstance(m, QUANT_LAYERS) and m.step_weights is not None}
    assert size.get("step_weights_packed_bytes", 0) >= sum(m.weight.numel() for m in with_copy.values())
    assert sorted(n for n, spec in meta["layers"].items() if "step_weights" in spec) == sorted(with_copy)
    sim = load_exported(tmp_path / "mix", "simulated")
    x = torch.randn(2, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size,
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in timesteps:
            assert torch.equal(sim(x, torch.tensor(t)).sample, mix(x, torch.tensor(t)).sample)
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    # on int8 kernels too, each step computes exactly what the low or the high model computes
    export_model(low, tmp_path / "low", recipe="rtn")
    export_model(high, tmp_path / "high", recipe="rtn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no VNNI: the saturation note
        integer = {name: load_exported(tmp_path / name, "integer") for name in ("mix", "low", "high")}
    with torch.no_grad():
        for t, h in zip(timesteps, use_high):
            out = integer["mix"](x, torch.tensor(t)).sample
            assert torch.equal(out, integer["high" if h else "low"](x, torch.tensor(t)).sample), t
        ts = torch.tensor(timesteps[:2])  # mixed steps in one batch: one kernel call per (row, weight copy)
        both = integer["mix"](x, ts).sample
        for i in range(2):
            assert torch.equal(both[i], integer["high" if use_high[i] else "low"](x, ts).sample[i])


def test_bit_operations_follow_the_schedule(mixed):
    fp, scheduler, timesteps, low, high, use_high, mix, switch = mixed
    kwargs = {"sample": torch.zeros(1, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size),
              "timestep": torch.tensor(timesteps[0])}
    macs = layer_macs(fp, kwargs)
    conv_in = fp.conv_in  # 3×3 conv, padding 1: H·W·C_out·C_in·9 MACs
    s = fp.config.sample_size
    assert macs["conv_in"] == s * s * conv_in.out_channels * conv_in.in_channels * 9
    fp_bops = sum(macs.values()) * 32 * 32
    for t, h in zip(timesteps, use_high):
        bops = bit_operations(mix, macs, t)
        assert bops == bit_operations(high if h else low, macs, t)
        assert bops < fp_bops
    assert bit_operations(low, macs, timesteps[0]) < bit_operations(high, macs, timesteps[0])
    # W4A8 → W8A8 doubles the bit-operations of every switched layer, W4A4 → W8A8 quadruples them
    layer = next(n for n, m in low.named_modules() if isinstance(m, QUANT_LAYERS) and m.weight_quantizers[0].bits == 4
                 or isinstance(m, QUANT_LAYERS) and m.input_quantizers and m.input_quantizers[0].bits == 4)
    one = {layer: macs[layer]}
    factor = {"act": 2, "both": 4, "weights": 2}[switch]
    assert bit_operations(high, one, timesteps[0]) == factor * bit_operations(low, one, timesteps[0])


def test_high_weights_come_from_the_fp_model_dilated():
    """with_weight_bits quantizes the FP model's weights, dilated like the layer's own, at the new bits: the
    high model is closer to FP than the low one, and its weights are the FP weights dilated."""
    fp = build_unet("attn-lpb1")
    batches = calibration_batches(fp)
    low = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=4, act_bits=8)), batches)
    high = with_weight_bits(low, 4, 8, fp)
    assert high.qdistill_config.weight_bits == 8 and low.qdistill_config.weight_bits == 4
    dilated = 0
    for name, m in high.named_modules():
        if isinstance(m, QUANT_LAYERS) and m.spec.weight_bits == 8 and low.get_submodule(name).spec.weight_bits == 4:
            w = fp.get_submodule(name).weight
            ref = torch.cat([dilate_weight(w[:, a:b], m.dilation_scale[a:b]) for a, b in m.input_groups], dim=1)
            assert torch.equal(m.weight, ref), name
            assert torch.equal(m.weight, low.get_submodule(name).weight), name  # untrained: the same weights
            dilated += bool((m.dilation_scale != 1).any())
    assert dilated > 0
    x = batches[0]
    with torch.no_grad():
        ref = fp(**x).sample
        err_low = (low(**x).sample - ref).pow(2).mean()
        err_high = (high(**x).sample - ref).pow(2).mean()
    assert err_high < 0.5 * err_low
    with pytest.raises(ValueError, match="no 3-bit weights"):
        with_weight_bits(low, 3, 8)
    # after training moved the float weights: fp_model=None quantizes the run's own, fp_model the FP model's
    trained = copy.deepcopy(low)
    name, layer = next((n, m) for n, m in trained.named_modules() if isinstance(m, QUANT_LAYERS) and m.spec.weight_bits == 4)
    with torch.no_grad():
        layer.weight.mul_(1.01)
    assert torch.equal(with_weight_bits(trained, 4, 8).get_submodule(name).weight, layer.weight)
    assert torch.equal(with_weight_bits(trained, 4, 8, fp).get_submodule(name).weight, high.get_submodule(name).weight)


def test_export_script_plans_the_schedule_within_the_budget(demo_pipeline_dir, tmp_path, capsys):
    """export.py mixed_precision.enabled=true: the budget holds, the schedule is in the exported TPQ rows (and,
    with mixed_precision.weight_bits=8, in second weight copies) and in quant_config.json, and the recorded
    bit-operations are the exported model's own."""
    import json

    from diffusers import UNet2DModel

    from qdistill.cli import main as qdistill
    from qdistill.data.model_folder import model_hash
    from qdistill.export import save_quantized

    fp = UNet2DModel.from_pretrained(demo_pipeline_dir / "unet").eval()
    q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=4, act_bits=4)), calibration_batches(fp))
    save_quantized(q, tmp_path / "run" / "quantized", recipe="rtn", source_model=str(demo_pipeline_dir),
                   source_model_hash=model_hash(demo_pipeline_dir))
    common = ["export", "--run", str(tmp_path / "run"), "mixed_precision.enabled=true", "measure.num_samples=2", "measure.steps=6",
              "measure.batch_size=2"]
    # the noise rule alone, then a budget between the all-A4 and the all-A8 cost
    assert qdistill([*common, "--out", str(tmp_path / "free")]) == 0
    free = json.loads((tmp_path / "free" / "quant_config.json").read_text())["step_bits"]
    assert qdistill([*common, "--out", str(tmp_path / "all8"), "mixed_precision.bops_budget=1.0"]) == 0
    cheapest = 4 * 4 / (32 * 32)  # below what the 8-bit first/last layers alone allow
    assert qdistill([*common, "--out", str(tmp_path / "tight"), f"mixed_precision.bops_budget={cheapest}"]) == 2
    assert "below the cost of running every step at low precision" in capsys.readouterr().err
    low_cost = min(free["bops_per_step"]) * len(free["bops_per_step"]) / (free["fp_bops_per_step"] * 6)
    budget = (low_cost + free["relative_bops"]) / 2
    assert free["act_bits"][-1] == 8  # the last step (ᾱ_prev = 1: no noise left to hide in) runs at 8 bits
    assert free["act_bits"].count(8) >= 2  # so the budget below has steps to send to 4 bits
    assert free["weight_bits"] == [4] * 6  # one weight copy: weights keep their bits
    assert qdistill([*common, "--out", str(tmp_path / "mixed"), f"mixed_precision.bops_budget={budget:.6f}"]) == 0
    meta = json.loads((tmp_path / "mixed" / "quant_config.json").read_text())["step_bits"]
    assert meta["relative_bops"] <= budget + 1e-9 < free["relative_bops"]
    assert meta["act_bits"].count(8) < free["act_bits"].count(8)
    mix = load_exported(tmp_path / "mixed", "simulated")
    macs = layer_macs(mix, {"sample": torch.zeros(1, 3, fp.config.sample_size, fp.config.sample_size),
                            "timestep": torch.tensor(0.0)})
    for t, bops in zip(meta["timesteps"], meta["bops_per_step"]):
        assert bit_operations(mix, macs, t) == pytest.approx(bops)
    # every 4-bit activation table now has the schedule's rows, each at its step's bits
    tables = [q for q in mix.modules() if isinstance(q, TemporalQuantizer) and q.bits == 4]
    assert tables and all(q.timesteps.tolist() == meta["timesteps"] and q.row_bits.tolist() == meta["act_bits"]
                          for q in tables)

    # weights too: W4A4 / W8A8 with a second, 8-bit weight copy from the FP model; the shipped recipe config
    assert qdistill([*common, "--config", "dilatequant+ptqd", "--out", str(tmp_path / "weights"),
                     "mixed_precision.weight_bits=8"]) == 0
    meta = json.loads((tmp_path / "weights" / "quant_config.json").read_text())
    plan = meta["step_bits"]
    assert plan["high_precision"] == free["high_precision"]  # the noise rule reads the low model alone
    assert plan["weight_bits"] == plan["act_bits"] == [8 if h else 4 for h in plan["high_precision"]]
    assert plan["relative_bops"] > free["relative_bops"]  # the high steps cost W8A8 now, not W4A8
    assert meta["format_version"] == 2 and "noise_correction" in meta and meta["recipe"] == "dilatequant+ptqd"
    mixw = load_exported(tmp_path / "weights", "simulated")
    copies = [m.step_weights for m in mixw.modules() if isinstance(m, QUANT_LAYERS) and m.step_weights is not None]
    assert copies and all(c.bits == 8 and c.use.tolist() == plan["high_precision"] for c in copies)
    for t, bops in zip(plan["timesteps"], plan["bops_per_step"]):
        assert bit_operations(mixw, macs, t) == pytest.approx(bops)
    # asking for fewer bits than the model has, and unknown keys, are config errors naming the key
    capsys.readouterr()
    assert qdistill([*common, "--out", str(tmp_path / "x"), "mixed_precision.weight_bits=2"]) == 2
    assert "mixed_precision.weight_bits (2) must exceed the model's weight bits (4)" in capsys.readouterr().err
    assert qdistill([*common, "--out", str(tmp_path / "x"), "mixed_precision.budget=0.1"]) == 2
    assert "unknown config key 'mixed_precision.budget'" in capsys.readouterr().err
    assert qdistill(["export", "--out", str(tmp_path / "x")]) == 2
    assert "config key 'run' is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
