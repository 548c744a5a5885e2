"""PTQD's quantization-noise correction: the statistics, the corrected scheduler, export storage, and
`qdistill export noise_correction=true` (the ptqd config) with `qdistill eval` end to end."""
import copy
import json

import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,
                       UNet2DModel)
from diffusers.models.unets.unet_2d import UNet2DOutput

from conftest import build_unet, calibration_batches, example_inputs
from qdistill.cli import main as qdistill
from qdistill.data.trajectories import record_trajectories, run_sampler, seeded_noise
from qdistill.export import NOISE_CORRECTION_FILE, ExportError, export_model, load_exported, load_noise_correction
from qdistill.analysis.noise_statistics import measure_noise_correction
from qdistill.quantizers import (NoiseCorrectedScheduler, NoiseCorrection, NoiseMoments, QuantConfig, TemporalQuantizer,
                                 estimate_noise_correction, fit_ranges_, quantize_)

# -- (a) the statistics ------------------------------------------------------------------------------------

SLOPES = {800.0: 0.2, 200.0: -0.1}
RESIDUAL_STD = {800.0: 0.05, 200.0: 0.02}  # std of r in Δ = kε + b + r


def synthetic_predictions(channels: int, per_step: int = 64, seed: int = 0):
    """FP predictions with channel means far from 0 (so the intercepts matter), and quantized ones with a known
    slope, per-channel bias and residual per timestep; rows of the two timesteps interleaved."""
    g = torch.Generator().manual_seed(seed)
    timesteps = torch.tensor([800.0, 200.0]).repeat(per_step)
    eps = torch.randn(2 * per_step, channels, 8, 8, generator=g) + torch.linspace(-1.5, 2.0, channels).view(1, -1, 1, 1)
    bias = {t: 0.2 * torch.randn(channels, generator=g) for t in SLOPES}
    eps_q = eps.clone()
    for t, k in SLOPES.items():
        rows = timesteps == t
        r = RESIDUAL_STD[t] * torch.randn(eps[rows].shape, generator=g)
        eps_q[rows] = eps[rows] + k * eps[rows] + bias[t].view(1, -1, 1, 1) + r
    return eps, eps_q, timesteps, bias


@pytest.mark.parametrize("channels", [3, 4])
def test_estimates_recover_slope_bias_and_residual_std(channels):
    eps, eps_q, timesteps, bias = synthetic_predictions(channels)
    nc = estimate_noise_correction(eps, eps_q, timesteps)
    assert nc.timesteps.tolist() == [200.0, 800.0] and nc.bias.shape == (2, channels)
    for i, t in enumerate(nc.timesteps.tolist()):
        k = SLOPES[t]
        # standard errors: slope ~ 0.05/sqrt(64·64·C) < 1e-3, bias ~ 1e-3 plus slope error × channel mean (≤ 2)
        assert nc.k[i].item() == pytest.approx(k, abs=3e-3), t
        assert torch.allclose(nc.bias[i], bias[t], atol=8e-3), (t, nc.bias[i], bias[t])
        assert nc.sigma[i].item() == pytest.approx(RESIDUAL_STD[t] / (1 + k), rel=0.04), t
        # σ_q is what remains in the corrected prediction
        rows = timesteps == t
        remaining = nc.correct(eps_q[rows], t) - eps[rows]
        assert remaining.mean().abs().item() < 1e-5
        assert remaining.std().item() == pytest.approx(nc.sigma[i].item(), rel=1e-3)


def test_streaming_moments_equal_one_shot_estimate():
    eps, eps_q, timesteps, _ = synthetic_predictions(3)
    moments = NoiseMoments()
    for part in range(0, len(eps), 24):  # batches that split the timesteps unevenly
        moments.add(eps[part:part + 24], eps_q[part:part + 24], timesteps[part:part + 24])
    streamed, once = moments.estimate(), estimate_noise_correction(eps, eps_q, timesteps)
    for key in ("timesteps", "k", "bias", "sigma"):
        assert torch.allclose(getattr(streamed, key), getattr(once, key), rtol=1e-5, atol=1e-7), key


def test_uncalibrated_timesteps_use_the_nearest_row_like_the_temporal_quantizer():
    table = torch.tensor([0.0, 250.0, 500.0, 999.0])
    nc = NoiseCorrection.zeros(table, channels=1)
    tq = TemporalQuantizer(8)
    tq.load_state_dict({"delta": torch.ones(4), "zero": torch.zeros(4), "timesteps": table})
    ts = torch.arange(0, 1000, dtype=torch.float32)
    assert [nc.row(t) for t in ts] == tq.rows_for(ts).tolist()
    assert nc.row(125) == 0 and nc.row(126) == 1 and nc.row(1200) == 3  # a tie goes to the smaller timestep


def test_invalid_statistics_are_refused():
    with pytest.raises(ValueError, match="k must be > -1"):
        NoiseCorrection([10.0], [-1.0], [[0.0]], [0.0])
    with pytest.raises(ValueError, match="shapes disagree"):
        NoiseCorrection([10.0, 20.0], [0.0], [[0.0]], [0.0])
    eps = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="anti-correlated"):
        estimate_noise_correction(eps, -eps, torch.full((4,), 5.0))
    with pytest.raises(ValueError, match="2 channels"):
        NoiseCorrection.zeros([5.0], channels=2).correct(torch.zeros(1, 3, 4, 4), 5)


class DistortedUNet(torch.nn.Module):
    """A stand-in quantized UNet: (1 + k)·ε_fp + b, so the statistics are known exactly."""

    def __init__(self, fp, k: float, bias: torch.Tensor):
        super().__init__()
        self.fp, self.k, self.bias = fp, k, bias

    def forward(self, sample, timestep):
        return UNet2DOutput(sample=(1 + self.k) * self.fp(sample, timestep).sample + self.bias.view(1, -1, 1, 1))


def test_measure_on_fp_trajectories_recovers_a_known_distortion():
    fp = build_unet("attn-lpb1")
    bias = torch.tensor([0.1, -0.05, 0.02])
    _, records = record_trajectories(fp, DDIMScheduler(), [0, 1], num_steps=4, batch_size=2, keep_steps=None)
    nc = measure_noise_correction(DistortedUNet(fp, 0.3, bias), records)
    assert nc.timesteps.numel() == 4
    assert torch.allclose(nc.k, torch.full((4,), 0.3), atol=1e-5)
    assert torch.allclose(nc.bias, bias.expand(4, 3), atol=1e-5)
    assert (nc.sigma < 1e-5).all()


# -- (b)–(d) the corrected scheduler -----------------------------------------------------------------------

KINDS = {
    "ddim-eta0": (lambda **kw: DDIMScheduler(**kw), 0.0),
    "ddim-eta0.7": (lambda **kw: DDIMScheduler(**kw), 0.7),
    "ddpm": (lambda **kw: DDPMScheduler(beta_schedule="squaredcos_cap_v2", **kw), 0.0),  # the bench's schedule
}
STEPS = 6


def step_pair(kind: str, correction_for, **scheduler_kwargs):
    """(plain scheduler, corrected scheduler over a separate copy, η), both after set_timesteps."""
    make, eta = KINDS[kind]
    plain, inner = make(**scheduler_kwargs), make(**scheduler_kwargs)
    plain.set_timesteps(STEPS)
    corrected = NoiseCorrectedScheduler(inner, correction_for(plain.timesteps))
    corrected.set_timesteps(STEPS)
    return plain, corrected, eta


def both_steps(plain, corrected, eps_plain, eps_q, t, x, eta, seed):
    """The plain step on eps_plain and the corrected step on eps_q, each with a generator seeded `seed`;
    returns the two outputs and the generators after the step."""
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    kw = {"eta": eta} if isinstance(plain, DDIMScheduler) else {}
    a = plain.step(eps_plain, t, x, generator=g1, **kw)
    b = corrected.step(eps_q, t, x, generator=g2, **kw)
    return a, b, g1, g2


@pytest.mark.parametrize("kind", list(KINDS))
def test_zero_statistics_step_equals_the_plain_step(kind):
    plain, corrected, eta = step_pair(kind, lambda ts: NoiseCorrection.zeros(ts, channels=3))
    g = torch.Generator().manual_seed(5)
    for i, t in enumerate(plain.timesteps):
        x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        a, b, g1, g2 = both_steps(plain, corrected, eps, eps, t, x, eta, seed=i)
        assert torch.equal(a.prev_sample, b.prev_sample), (kind, int(t))
        assert torch.equal(a.pred_original_sample, b.pred_original_sample)
        assert torch.equal(g1.get_state(), g2.get_state())  # the RNG advanced as diffusers advances it
    tuple_out = corrected.step(eps, t, x, return_dict=False, **({"eta": eta} if "ddim" in kind else {}))
    assert isinstance(tuple_out, tuple) and len(tuple_out) == 2


@pytest.mark.parametrize("kind", list(KINDS))
def test_zero_statistics_sampler_loop_and_pipeline_equal_the_plain_ones(kind):
    unet = build_unet("attn-lpb1")
    make, eta = KINDS[kind]
    noise = seeded_noise([3, 4], (3, 16, 16))
    corrected = NoiseCorrectedScheduler(make(), NoiseCorrection.zeros([999.0, 0.0], channels=3))
    finals = [run_sampler(unet, s, noise, 5, eta=eta, generator=torch.Generator().manual_seed(11))
              for s in (make(), corrected)]
    assert torch.equal(finals[0], finals[1])
    # as `pipe.scheduler` of a diffusers pipeline
    if kind.startswith("ddim"):
        pipe, call = DDIMPipeline(unet=unet, scheduler=make()), {"eta": eta}
    else:
        pipe, call = DDPMPipeline(unet=unet, scheduler=make()), {}
    pipe.set_progress_bar_config(disable=True)
    images = []
    for scheduler in (make(), corrected):
        pipe.scheduler = scheduler
        images.append(pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(2),
                           output_type="np", **call).images)
    assert (images[0] == images[1]).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_slope_and_bias_correct_the_prediction_before_the_step(kind):
    k = {999.0: 0.25, 0.0: -0.125}  # exact in binary, so both sides compute the same floats
    bias = torch.tensor([[0.125, -0.5, 0.0], [0.25, 0.0625, -0.25]])

    def correction(_):
        return NoiseCorrection([0.0, 999.0], [k[0.0], k[999.0]], bias, [0.0, 0.0])

    plain, corrected, eta = step_pair(kind, correction)
    g = torch.Generator().manual_seed(6)
    for i, t in enumerate(plain.timesteps):
        row = 1 if t > 499 else 0  # nearest measured timestep
        x, eps_q = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        expected_eps = (eps_q - bias[row].view(1, 3, 1, 1)) / (1 + [k[0.0], k[999.0]][row])
        a, b, _, _ = both_steps(plain, corrected, expected_eps, eps_q, t, x, eta, seed=i)
        assert torch.equal(a.prev_sample, b.prev_sample), (kind, int(t))


def empirical_noise_terms(plain, t, x, eta):
    """c_t and σ_t measured from the plain scheduler's own outputs (linear in ε with clipping off)."""
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    if isinstance(plain, DDIMScheduler):
        def out(eps, z):
            return plain.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        mean = out(zeros, zeros)
        return (out(ones, zeros) - mean).mean().item(), (out(zeros, ones) - mean).mean().item()

    def out(eps, seed):
        return plain.step(eps, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
    c = (out(ones, 0) - out(zeros, 0)).mean().item()  # same seed: the noise cancels
    dz = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) - torch.randn(
        x.shape, generator=torch.Generator().manual_seed(0))
    sigma = ((out(zeros, 1) - out(zeros, 0)) * dz).sum().item() / dz.pow(2).sum().item()
    return c, sigma


@pytest.mark.parametrize("kind", ["ddim-eta0.7", "ddpm"])
def test_variance_calibration_shrinks_the_injected_noise_by_c2_sigma_q2(kind):
    make, eta = KINDS[kind]
    plain = make(clip_sample=False)
    plain.set_timesteps(STEPS)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    terms = {int(t): empirical_noise_terms(plain, t, x, eta) for t in plain.timesteps}
    # σ_q per step so that c_t²σ_q² = 0.36 σ_t²: the injected std must become 0.8 σ_t
    sigma_q = [0.6 * abs(s) / abs(c) for c, s in terms.values()]
    table = NoiseCorrection(plain.timesteps.float(), torch.zeros(STEPS), torch.zeros(STEPS, 3), sigma_q)
    corrected = NoiseCorrectedScheduler(make(clip_sample=False), table)
    corrected.set_timesteps(STEPS)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    shrunk = 0
    for i, t in enumerate(plain.timesteps):
        c, sigma = terms[int(t)]
        noise = corrected.step_noise(t, eta)
        assert noise.c == pytest.approx(c, rel=1e-4, abs=1e-6)
        assert noise.sigma == pytest.approx(sigma, rel=1e-4, abs=1e-7)
        if sigma == 0:
            continue  # DDPM's last step adds no noise
        assert noise.sigma_corrected**2 == pytest.approx(sigma**2 - c**2 * sigma_q[i]**2, rel=1e-4)
        assert noise.sigma_corrected == pytest.approx(0.8 * sigma, rel=1e-4)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))  # what diffusers draws
        a, b, g1, g2 = both_steps(plain, corrected, eps, eps, t, x, eta, seed=i)
        assert torch.allclose(b.prev_sample - a.prev_sample, (noise.sigma_corrected - sigma) * z, atol=2e-6)
        assert torch.equal(g1.get_state(), g2.get_state())
        shrunk += 1
    assert shrunk >= STEPS - 1

    # a residual larger than the schedule's noise: no noise injected at all, never NaN
    huge = NoiseCorrectedScheduler(make(clip_sample=False), NoiseCorrection.zeros(plain.timesteps, 3))
    huge.correction.sigma.fill_(1e6)
    huge.set_timesteps(STEPS)
    for i, t in enumerate(plain.timesteps):
        c, sigma = terms[int(t)]
        assert huge.step_noise(t, eta).sigma_corrected == 0.0
        a, b, _, _ = both_steps(plain, huge, eps, eps, t, x, eta, seed=i)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        assert torch.isfinite(b.prev_sample).all()
        assert torch.allclose(b.prev_sample, a.prev_sample - sigma * z, atol=2e-6)  # the noise-free mean


def test_unsupported_schedulers_are_refused_with_a_clear_error():
    zeros = NoiseCorrection.zeros([0.0], 3)
    with pytest.raises(ValueError, match="variance_type 'fixed_small' only, got 'fixed_large'"):
        NoiseCorrectedScheduler(DDPMScheduler(variance_type="fixed_large"), zeros)
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon'"):
        NoiseCorrectedScheduler(DDIMScheduler(prediction_type="v_prediction"), zeros)
    with pytest.raises(TypeError, match="DDIMScheduler and DDPMScheduler, not DPMSolverMultistepScheduler"):
        NoiseCorrectedScheduler(DPMSolverMultistepScheduler(), zeros)


def test_the_wrapper_delegates_to_the_wrapped_scheduler():
    inner = DDIMScheduler(num_train_timesteps=500)
    wrapped = NoiseCorrectedScheduler(inner, NoiseCorrection.zeros([0.0], 1))
    wrapped.set_timesteps(7)
    assert wrapped.config is inner.config and wrapped.config.num_train_timesteps == 500
    assert torch.equal(wrapped.timesteps, inner.timesteps) and len(wrapped.timesteps) == 7
    assert wrapped.init_noise_sigma == inner.init_noise_sigma and len(wrapped) == len(inner)
    x = torch.randn(1, 1, 4, 4)
    assert wrapped.scale_model_input(x, wrapped.timesteps[0]) is x


# -- (e) storage in the export ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_quantized():
    fp = build_unet("attn-lpb1")
    return fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8)), calibration_batches(fp))


def test_export_round_trip_and_damaged_statistics(tiny_quantized, tmp_path):
    eps, eps_q, timesteps, _ = synthetic_predictions(3)
    nc = estimate_noise_correction(eps, eps_q, timesteps)
    export_model(tiny_quantized, tmp_path / "plain", recipe="test")
    assert load_noise_correction(tmp_path / "plain") is None
    export_model(tiny_quantized, tmp_path / "e", recipe="test", noise_correction=nc)
    loaded = load_noise_correction(tmp_path / "e")
    for key in ("timesteps", "k", "bias", "sigma"):
        assert torch.equal(getattr(loaded, key), getattr(nc, key)), key
    meta = json.loads((tmp_path / "e" / "quant_config.json").read_text())
    assert meta["noise_correction"] == {"method": "ptqd", "file": NOISE_CORRECTION_FILE, "steps": 2, "channels": 3}
    kw = example_inputs(tiny_quantized, seed=4)
    with torch.no_grad():  # the model file is unaffected
        assert torch.equal(load_exported(tmp_path / "e")(**kw).sample, tiny_quantized(**kw).sample)

    file = tmp_path / "e" / NOISE_CORRECTION_FILE
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x21  # tampered: same size
    file.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{NOISE_CORRECTION_FILE} was modified"):
        load_noise_correction(tmp_path / "e")
    file.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ExportError, match=f"{NOISE_CORRECTION_FILE} is truncated"):
        load_noise_correction(tmp_path / "e")
    file.unlink()
    with pytest.raises(ExportError, match=f"lacks {NOISE_CORRECTION_FILE}"):
        load_noise_correction(tmp_path / "e")


# -- (f) qdistill export --config ptqd, qdistill eval -----------------------------------

def test_export_measures_and_eval_samples_with_the_correction(demo_pipeline_dir, tiny_quantized, tmp_path, capsys):
    from qdistill.data.model_folder import model_hash
    from qdistill.evaluation.reference_cache import load_reference
    from qdistill.export import save_quantized

    fp = UNet2DModel.from_pretrained(demo_pipeline_dir / "unet").eval()
    q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=4, act_bits=8)), calibration_batches(fp))
    save_quantized(q, tmp_path / "run" / "quantized", recipe="rtn", source_model=str(demo_pipeline_dir),
                   source_model_hash=model_hash(demo_pipeline_dir))
    # the shipped recipe config, on this run, measured on DDPM
    nc_args = ["--config", "ptqd", "measure.num_samples=4", "measure.steps=5", "measure.scheduler=ddpm",
               "measure.batch_size=2"]
    assert qdistill(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "e"), *nc_args]) == 0
    out = capsys.readouterr().out
    nc = load_noise_correction(tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "quant_config.json").read_text())
    assert meta["recipe"] == "ptqd" and meta["trained_recipe"] == "rtn"
    assert meta["export_config"]["measure"]["scheduler"] == "ddpm" and meta["export_config"]["run"] == str(tmp_path / "run")
    ddpm = DDPMScheduler.from_pretrained(demo_pipeline_dir / "scheduler")
    ddpm.set_timesteps(5)
    assert nc.timesteps.tolist() == sorted(ddpm.timesteps.float().tolist()) and nc.num_channels == 3
    lines = [line.split()[1:] for line in out.splitlines()]
    header = lines.index(["t", "k", "mean|b|", "sigma_q"])
    summary = lines[header + 1:header + 6]  # one row per step, in sampler order
    assert [float(row[0]) for row in summary] == ddpm.timesteps.float().tolist()
    assert [float(row[1]) for row in summary] == pytest.approx(nc.k.flip(0).tolist(), abs=1e-4)
    assert (nc.k.abs() > 0).all() and (nc.sigma > 0).all()

    common = ["eval", f"model={tmp_path / 'e'}", f"reference={demo_pipeline_dir}", "mode=simulated", "scheduler=ddpm",
              "steps=5", "num_samples=4", "batch_size=2", "fidelity_samples=2",
              f"classifier={tmp_path / 'no-classifier'}"]
    # a ptqd export samples with its correction by default, the same as ptqd=true; ptqd=false samples plainly
    assert qdistill([*common, f"out={tmp_path / 'ptqd'}", f"cache_dir={tmp_path / 'c1'}"]) == 0
    assert qdistill([*common, "ptqd=false", f"out={tmp_path / 'plain'}", f"cache_dir={tmp_path / 'c2'}"]) == 0
    assert qdistill([*common, "ptqd=true", f"out={tmp_path / 'flag'}", f"cache_dir={tmp_path / 'c2'}"]) == 0
    with_ptqd, without, flag = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ptqd", "plain", "flag"))
    assert with_ptqd["ptqd_noise_correction"] is True and without["ptqd_noise_correction"] is False
    assert "PTQD" in with_ptqd["sampler"] and with_ptqd["psnr_db"] != without["psnr_db"]
    assert flag["psnr_db"] == with_ptqd["psnr_db"]
    # the FP reference is sampled with the plain scheduler either way: the same images and trajectory
    refs = [load_reference(tmp_path / c, next((tmp_path / c).iterdir()).name) for c in ("c1", "c2")]
    assert torch.equal(refs[0][0], refs[1][0])
    assert with_ptqd["noise_pred_mse_per_step"] == without["noise_pred_mse_per_step"]

    # an export without statistics: ptqd=true stops with a clear error
    export_model(tiny_quantized, tmp_path / "bare", recipe="test")
    capsys.readouterr()
    assert qdistill(["eval", f"model={tmp_path / 'bare'}", f"reference={demo_pipeline_dir}", "ptqd=true",
                     f"out={tmp_path / 'x'}", f"cache_dir={tmp_path / 'c3'}"]) == 2
    assert "holds no noise-correction statistics" in capsys.readouterr().err
