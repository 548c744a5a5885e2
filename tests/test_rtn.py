import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from conftest import build_unet, calibration_batches, example_inputs, rel_err
from qdistill.quantizers import QuantConfig, fit_ranges_, quantize_
from qdistill.export import CheckpointError, load_quantized, save_quantized


def rtn(fp, weight_bits, act_bits, **kw):
    cfg = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, per_timestep=False, weight_dilation=False, **kw)
    model = quantize_(copy.deepcopy(fp), cfg)
    return fit_ranges_(model, calibration_batches(fp))


@pytest.fixture(scope="module")
def fp():
    return build_unet("attn-lpb1")


@pytest.fixture(scope="module")
def w8a8(fp):
    return rtn(fp, 8, 8)


@pytest.fixture(scope="module")
def w4a4(fp):
    return rtn(fp, 4, 4)


def test_w8a8_error_is_far_below_w4a4(fp, w8a8, w4a4):
    kw = example_inputs(fp, batch=4, seed=7, timesteps=[999, 750, 250, 0])
    with torch.no_grad():
        ref = fp(**kw).sample
        e8, e4 = rel_err(w8a8(**kw).sample, ref), rel_err(w4a4(**kw).sample, ref)
    assert e8 < 0.05, e8
    assert e8 < 0.2 * e4, (e8, e4)


@pytest.mark.parametrize("pipeline_cls,scheduler_cls", [(DDIMPipeline, DDIMScheduler), (DDPMPipeline, DDPMScheduler)])
def test_quantized_models_run_in_diffusers_pipelines(fp, w8a8, w4a4, pipeline_cls, scheduler_cls):
    scheduler = scheduler_cls(num_train_timesteps=1000)
    images = {}
    for name, unet in (("fp", fp), ("w8a8", w8a8), ("w4a4", w4a4)):
        pipe = pipeline_cls(unet=unet, scheduler=copy.deepcopy(scheduler))
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                            output_type="np").images
        assert images[name].shape == (2, 16, 16, 3) and np.isfinite(images[name]).all()
    assert type(w8a8) is type(fp)
    d8, d4 = (np.abs(images[k] - images["fp"]).mean() for k in ("w8a8", "w4a4"))
    assert d8 < d4


def test_conditional_guidance_loop():
    """A classifier-free-guidance loop (batch 2B, one scalar timestep, text embeddings): the W8A8 model's
    noise predictions for both halves stay close to FP's on the same inputs at every step."""
    fp = build_unet("xattn-lpb1")
    q = quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8))
    fit_ranges_(q, calibration_batches(fp))
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 5, 24, generator=g)
    x = torch.randn(2, 4, 16, 16, generator=g)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(5)

    def both_halves(unet, x, t):
        return unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([torch.zeros_like(cond), cond])).sample

    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_fp, eps_q = both_halves(fp, x, t), both_halves(q, x, t)
            assert torch.isfinite(eps_q).all() and rel_err(eps_q, eps_fp) < 0.1
            uncond, text = eps_q.chunk(2)
            x = scheduler.step(uncond + 3.0 * (text - uncond), t, x).prev_sample


def test_save_and_load_reproduce_outputs_exactly(fp, w4a4, tmp_path):
    save_quantized(w4a4, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    assert type(loaded) is type(fp)
    kw = example_inputs(fp, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, w4a4(**kw).sample)


def test_truncated_state_is_a_clear_error(w4a4, tmp_path):
    save_quantized(w4a4, tmp_path / "q")
    state = tmp_path / "q" / "quantized_state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="quantized_state.safetensors"):
        load_quantized(tmp_path / "q")


def test_a_failed_save_keeps_the_previous_one(w4a4, tmp_path):
    save_quantized(w4a4, tmp_path / "q")
    before = (tmp_path / "q" / "quantized_state.safetensors").read_bytes()

    class Boom(Exception):
        pass

    broken = copy.deepcopy(w4a4)
    broken.save_config = lambda path: (_ for _ in ()).throw(Boom())
    with pytest.raises(Boom):
        save_quantized(broken, tmp_path / "q")
    assert (tmp_path / "q" / "quantized_state.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary left behind
