"""PTQD's step-aware mixed precision: the schedule respects its budget, lives in the TPQ rows, and sampling
runs every step at its own bit-width (simulated, exported and on integer kernels)."""
import copy
import random

import pytest
import torch
from diffusers import DDIMScheduler

from conftest import build_unet, calibration_batches
from qdistill.data.trajectories import run_sampler
from qdistill.export import export_model, load_exported
from qdistill.quantizers import QuantConfig, calibrate_, quantize_
from qdistill.quantizers.integer_kernels import unavailable_reason
from qdistill.quantizers.mixed_precision import (apply_step_bits, bit_operations, choose_step_bits, layer_macs,
                                                 with_act_bits)
from qdistill.quantizers.temporal import TemporalQuantizer

STEPS = 6


def test_choose_step_bits_threshold_then_budget():
    ratio = [3.0, 0.2, 1.5, 0.9, 2.0, 0.5]
    low, high = [1.0] * 6, [4.0] * 6
    # no budget: low exactly where the low-bit noise stays below the sampler's
    assert choose_step_bits(ratio, low, high, None) == [8, 4, 8, 4, 8, 4]
    # the noise rule costs 3·1 + 3·4 = 15; a budget of 12 sends the smallest-ratio high step (1.5) low
    assert choose_step_bits(ratio, low, high, 12.0) == [8, 4, 4, 4, 8, 4]
    assert choose_step_bits(ratio, low, high, 15.0) == [8, 4, 8, 4, 8, 4]  # already within budget
    with pytest.raises(ValueError, match="below the cost of running every step at 4 bits"):
        choose_step_bits(ratio, low, high, 5.0)


def test_choose_step_bits_never_exceeds_budget():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        ratio = [rng.uniform(0, 3) for _ in range(n)]
        lo = [rng.uniform(0.5, 1.0) for _ in range(n)]
        hi = [x * rng.uniform(1.5, 4.0) for x in lo]
        budget = rng.uniform(sum(lo), sum(hi) * 1.1)
        bits = choose_step_bits(ratio, lo, hi, budget)
        assert sum(a if b == 4 else c for b, a, c in zip(bits, lo, hi)) <= budget + 1e-9
        # every low step under the noise rule stays low; a step the budget sent low has a smaller ratio than
        # every step left high
        assert all(b == 4 for b, r in zip(bits, ratio) if r <= 1)
        forced = [r for b, r in zip(bits, ratio) if b == 4 and r > 1]
        kept = [r for b, r in zip(bits, ratio) if b == 8]
        assert not forced or not kept or max(forced) <= min(kept)


@pytest.fixture(scope="module")
def mixed():
    """A tiny UNet at W8A4 calibrated on the DDIM steps, its A8 twin, and the mix on an alternating schedule."""
    fp = build_unet("attn-lpb1")
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    timesteps = [float(t) for t in scheduler.timesteps]
    batches = calibration_batches(fp, timesteps=timesteps, batches=3)
    low = calibrate_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=4)), batches)
    high = with_act_bits(low, 4, 8, batches)
    bits = [4, 8] * (STEPS // 2)
    mix = apply_step_bits(copy.deepcopy(low), high, timesteps, bits)
    return fp, scheduler, timesteps, low, high, bits, mix


def test_mixed_model_runs_each_step_at_its_bits(mixed):
    fp, scheduler, timesteps, low, high, bits, mix = mixed
    x = torch.randn(2, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size,
                    generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t, b in zip(timesteps, bits):
            out = mix(x, torch.tensor(t)).sample
            ref = (low if b == 4 else high)(x, torch.tensor(t)).sample
            assert torch.equal(out, ref), f"timestep {t} ({b} bits)"
            other = (high if b == 4 else low)(x, torch.tensor(t)).sample
            assert not torch.equal(out, other)
    # 8-bit activations where the first and last convs were already: those tables are untouched
    switched = [q for q in mix.modules() if isinstance(q, TemporalQuantizer) and q._mixed_bits]
    assert switched and all(q.row_bits.tolist() == bits for q in switched)


def test_sampling_switches_bits_per_step(mixed):
    """A whole DDIM run of the mixed model equals a run that calls the low or high model by the schedule."""
    fp, scheduler, timesteps, low, high, bits, mix = mixed
    noise = torch.randn(2, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size,
                        generator=torch.Generator().manual_seed(6))
    by_t = dict(zip(timesteps, bits))

    class Switch(torch.nn.Module):  # what the schedule means, written out
        config = fp.config

        def forward(self, x, t):
            return (low if by_t[float(t)] == 4 else high)(x, t)

    a = run_sampler(mix, scheduler, noise, STEPS)
    b = run_sampler(Switch(), scheduler, noise, STEPS)
    assert torch.equal(a, b)


def test_schedule_survives_export_and_runs_on_integer_kernels(mixed, tmp_path):
    fp, scheduler, timesteps, low, high, bits, mix = mixed
    export_model(mix, tmp_path / "mix", recipe="rtn+mixed")
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
    with pytest.warns(UserWarning):
        integer = {name: load_exported(tmp_path / name, "integer") for name in ("mix", "low", "high")}
    with torch.no_grad():
        for t, b in zip(timesteps, bits):
            out = integer["mix"](x, torch.tensor(t)).sample
            assert torch.equal(out, integer["low" if b == 4 else "high"](x, torch.tensor(t)).sample), t


def test_bit_operations_follow_the_schedule(mixed):
    fp, scheduler, timesteps, low, high, bits, mix = mixed
    kwargs = {"sample": torch.zeros(1, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size),
              "timestep": torch.tensor(timesteps[0])}
    macs = layer_macs(fp, kwargs)
    conv_in = fp.conv_in  # 3×3 conv, padding 1: H·W·C_out·C_in·9 MACs
    s = fp.config.sample_size
    assert macs["conv_in"] == s * s * conv_in.out_channels * conv_in.in_channels * 9
    fp_bops = sum(macs.values()) * 32 * 32
    for t, b in zip(timesteps, bits):
        bops = bit_operations(mix, macs, t)
        assert bops == bit_operations(low if b == 4 else high, macs, t)
        assert bops < fp_bops
    assert bit_operations(low, macs, timesteps[0]) < bit_operations(high, macs, timesteps[0])


def test_export_script_plans_the_schedule_within_the_budget(demo_pipeline_dir, tmp_path, capsys):
    """export.py --mixed-precision: the budget holds, the schedule is in the exported TPQ rows and in
    quant_config.json, and the recorded bit-operations are the exported model's own."""
    import json

    from diffusers import UNet2DModel

    from conftest import load_script
    from qdistill.data.model_folder import model_hash
    from qdistill.trainer.checkpoint import save_quantized

    fp = UNet2DModel.from_pretrained(demo_pipeline_dir / "unet").eval()
    q = calibrate_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=4, act_bits=4)), calibration_batches(fp))
    save_quantized(q, tmp_path / "run" / "quantized", recipe="rtn", source_model=str(demo_pipeline_dir),
                   source_model_hash=model_hash(demo_pipeline_dir))
    export = load_script("export")
    common = ["--run", str(tmp_path / "run"), "--mixed-precision", "--nc-samples", "2", "--nc-steps", "6",
              "--nc-batch-size", "2"]
    # the noise rule alone, then a budget between the all-A4 and the all-A8 cost
    assert export.main([*common, "--out", str(tmp_path / "free")]) == 0
    free = json.loads((tmp_path / "free" / "quant_config.json").read_text())["step_bits"]
    assert export.main([*common, "--out", str(tmp_path / "all8"), "--bops-budget", "1.0"]) == 0
    cheapest = 4 * 4 / (32 * 32)  # below what the 8-bit first/last layers alone allow
    assert export.main([*common, "--out", str(tmp_path / "tight"), "--bops-budget", str(cheapest)]) == 2
    assert "below the cost of running every step at 4 bits" in capsys.readouterr().err
    low_cost = min(free["bops_per_step"]) * len(free["bops_per_step"]) / (free["fp_bops_per_step"] * 6)
    budget = (low_cost + free["relative_bops"]) / 2
    assert free["act_bits"][-1] == 8  # the last step (ᾱ_prev = 1: no noise left to hide in) runs at 8 bits
    assert free["act_bits"].count(8) >= 2  # so the budget below has steps to send to 4 bits
    assert export.main([*common, "--out", str(tmp_path / "mixed"), "--bops-budget", f"{budget:.6f}"]) == 0
    meta = json.loads((tmp_path / "mixed" / "quant_config.json").read_text())["step_bits"]
    assert meta["relative_bops"] <= budget + 1e-9 < free["relative_bops"]
    assert meta["act_bits"].count(8) < free["act_bits"].count(8)
    mix = load_exported(tmp_path / "mixed", "simulated")
    macs = layer_macs(mix, {"sample": torch.zeros(1, 3, fp.config.sample_size, fp.config.sample_size),
                            "timestep": torch.tensor(0.0)})
    for t, b, bops in zip(meta["timesteps"], meta["act_bits"], meta["bops_per_step"]):
        assert bit_operations(mix, macs, t) == pytest.approx(bops)
    # every 4-bit activation table now has the schedule's rows, each at its step's bits
    tables = [q for q in mix.modules() if isinstance(q, TemporalQuantizer) and q.bits == 4]
    assert tables and all(q.timesteps.tolist() == meta["timesteps"] and q.row_bits.tolist() == meta["act_bits"]
                          for q in tables)
