"""Export folders: packed codes, exact reload (`simulated`), real int8 kernels (`integer`), damaged files."""
import copy
import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from conftest import REPO, build_unet, calibration_batches, example_inputs, rel_err
from qdistill.export import EXPORT_FILE, ExportError, export_model, load_exported
from qdistill.quantizers import QuantConfig, fit_ranges_, quantize_, set_timesteps
from qdistill.quantizers.integer_kernels import saturation_reason, unavailable_reason
from qdistill.quantizers.integer_layers import IntegerLayer
from qdistill.quantizers.layers import QUANT_LAYERS
from qdistill.quantizers.packing import pack_codes, unpack_codes

needs_kernels = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
# integer-vs-simulated bounds hold where the kernels are exact (a CPU with VNNI)
needs_exact_kernels = pytest.mark.skipif(saturation_reason() is not None, reason=str(saturation_reason()))


@pytest.mark.parametrize("bits,qmin", [(4, 0), (4, -8), (3, 0), (8, 0), (8, -128), (6, -32)])
def test_packing_round_trips_exactly(bits, qmin):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(qmin, qmin + 2**bits, (7, 5, 3), generator=g).to(torch.int16)  # odd count: a padded nibble
    packed = pack_codes(q, bits, qmin)
    assert packed.dtype == torch.uint8
    assert packed.numel() == ((q.numel() + 1) // 2 if bits <= 4 else q.numel())  # 2 codes a byte up to 4 bits
    assert torch.equal(unpack_codes(packed, bits, qmin, q.shape), q)
    with pytest.raises(ValueError, match="outside"):
        pack_codes(q + 2**bits, bits, qmin)
    with pytest.raises(ValueError, match="need"):
        unpack_codes(packed[:-1], bits, qmin, q.shape)


def trained_like(model):
    """Parameters moved as training moves them: weights off the grid, negative and tiny step sizes, zero
    points off the integers (export must store exactly what fake quantization uses)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("delta"):
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
                p[..., :1].neg_()
            elif name.endswith("zero") and p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tiny_models():
    """A tiny UNet with attention and a split shortcut conv, at W4A8 and W8A8 (asymmetric 8-bit weights need
    the zero-point correction), calibrated and perturbed like trained models."""
    fp = build_unet("attn-lpb1")
    out = {}
    for wb, ab in ((4, 8), (8, 8), (4, 4)):
        q = quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=wb, act_bits=ab))
        out[(wb, ab)] = trained_like(fit_ranges_(q, calibration_batches(fp)))
    return fp, out


@pytest.mark.parametrize("bits", [(4, 8), (8, 8), (4, 4)])
def test_export_then_simulated_reload_is_bit_identical(tiny_models, tmp_path, bits):
    fp, models = tiny_models
    q = models[bits]
    size = export_model(q, tmp_path / "export", recipe="test")
    loaded = load_exported(tmp_path / "export", "simulated")
    assert type(loaded) is type(fp)
    for ts in ([999, 750, 250, 0], [600, 600, 600, 600], [31, 500, 977, 3]):
        kw = example_inputs(fp, batch=4, seed=11, timesteps=ts)
        with torch.no_grad():
            assert torch.equal(loaded(**kw).sample, q(**kw).sample)
    meta = json.loads((tmp_path / "export" / "quant_config.json").read_text())
    split = [n for n, s in meta["layers"].items() if len(s["input_groups"]) > 1]
    assert split, "the fixture must exercise a split shortcut layer"
    assert meta["quant_config"]["weight_bits"] == bits[0] and meta["files"][EXPORT_FILE]["bytes"] == size["file_bytes"]


def test_packed_int4_codes_are_the_quantizer_integers(tiny_models, tmp_path):
    from safetensors.torch import load_file

    _, models = tiny_models
    q = models[(4, 8)]
    export_model(q, tmp_path / "e", recipe="test")
    tensors = load_file(str(tmp_path / "e" / EXPORT_FILE))
    checked = 0
    for name, m in q.named_modules():
        if isinstance(m, QUANT_LAYERS) and m.spec.weight_bits == 4:
            for g, (wq, (a, b)) in enumerate(zip(m.weight_quantizers, m.input_groups)):
                w = m.weight.detach()[:, a:b]
                codes = tensors[f"{name}.weight.{g}.codes"]
                assert codes.numel() == (w.numel() + 1) // 2  # two codes per byte
                assert torch.equal(unpack_codes(codes, 4, wq.qmin, w.shape), wq.to_int(w))
                checked += 1
    assert checked > 5


def test_size_of_w4_export_near_one_eighth(tiny_models, tmp_path):
    _, models = tiny_models
    s4 = export_model(models[(4, 8)], tmp_path / "w4", recipe="test")
    s8 = export_model(models[(8, 8)], tmp_path / "w8", recipe="test")
    # 4-bit codes + per-channel scale/zero point; first/last conv and time embedding stay at 8 bits
    assert s4["by_bits"]["4"]["ratio"] < 0.14, s4
    assert 0.25 <= s8["by_bits"]["8"]["ratio"] < 0.27, s8
    assert s4["file_bytes"] < s8["file_bytes"] < s8["fp32_model_bytes"]


def test_damaged_exports_are_refused_with_the_file_named(tiny_models, tmp_path):
    _, models = tiny_models
    export_model(models[(4, 8)], tmp_path / "e", recipe="test")
    file = tmp_path / "e" / EXPORT_FILE
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x55  # tampered: same size, different bytes
    file.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{EXPORT_FILE}.*modified"):
        load_exported(tmp_path / "e")
    file.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(ExportError, match=f"{EXPORT_FILE}.*truncated"):
        load_exported(tmp_path / "e")
    file.unlink()
    with pytest.raises(ExportError, match=f"lacks {EXPORT_FILE}"):
        load_exported(tmp_path / "e")


def test_export_overwrites_atomically(tiny_models, tmp_path):
    """A failing export leaves the previous export as it was."""
    _, models = tiny_models
    export_model(models[(4, 8)], tmp_path / "e", recipe="first")
    before = (tmp_path / "e" / EXPORT_FILE).read_bytes()
    broken = copy.deepcopy(models[(4, 8)])
    broken.qdistill_config = None
    with pytest.raises(ExportError):
        export_model(broken, tmp_path / "e", recipe="second")
    assert (tmp_path / "e" / EXPORT_FILE).read_bytes() == before
    load_exported(tmp_path / "e")


# -- integer kernels on the bench model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_exports(tmp_path_factory):
    """The bench teacher at W8A8 and W4A4 (TPQ, dilation, split shortcuts), calibrated on a few timesteps,
    exported and loaded back both ways."""
    fp = UNet2DModel.from_pretrained(REPO / "assets" / "teacher" / "unet").eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"sample": torch.randn(4, 1, 32, 32, generator=g), "timestep": torch.full((4,), float(t))}
               for t in (999, 759, 519, 279, 39)]
    out = {}
    for wb, ab in ((8, 8), (4, 4)):
        q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=wb, act_bits=ab)), batches)
        path = tmp_path_factory.mktemp("bench") / f"w{wb}a{ab}"
        export_model(q, path, recipe="test")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            integer = load_exported(path, "integer")
        assert not [w for w in caught if "attention" in str(w.message)]  # attention runs on codes, not simulated
        assert len(integer.qdistill_export["integer_report"]["attention"]) == 4  # the bench's four attention layers
        out[(wb, ab)] = (load_exported(path, "simulated"), integer)
    return fp, out


def test_int8_saturation_is_flagged_on_cpus_without_vnni():
    assert saturation_reason(frozenset({"avx2", "avx512f", "avx512_vnni"})) is None
    assert saturation_reason(frozenset({"avx2", "avx_vnni"})) is None
    assert "no VNNI" in saturation_reason(frozenset({"avx2", "fma"}))


@needs_kernels
@needs_exact_kernels
@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_integer_layers_match_simulated_per_layer(bench_exports, bits):
    """Every layer on the same input: integer within 1e-3 relative error of simulated (the products are exact
    integers; what differs is the float scaling and, at exact ties, a code one step off)."""
    _, models = bench_exports
    sim, integer = models[bits]
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n, m in sim.named_modules() if isinstance(m, QUANT_LAYERS)]
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([999.0, 999, 519, 519, 519, 39, 39, 700])  # mixed rows, one uncalibrated timestep
    with torch.no_grad():
        sim(x, t)
    for h in hooks:
        h.remove()
    errors, corrected = {}, 0
    with torch.no_grad():
        for name, m in integer.named_modules():
            if isinstance(m, IntegerLayer):
                set_timesteps(m, t)
                x_in, y_sim = seen[name]
                errors[name] = rel_err(m(x_in), y_sim)
                corrected += any(w.correction is not None for parts in m.weights[0] for _, _, w in parts)
    assert len(errors) == len(seen)
    assert max(errors.values()) < 1e-3, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    if bits == (8, 8):
        assert corrected > 10  # asymmetric 8-bit weights went through the zero-point correction


@needs_kernels
@needs_exact_kernels
@pytest.mark.parametrize("bits,tolerance", [((8, 8), 0.02), ((4, 4), 0.05)])
def test_integer_model_matches_simulated_end_to_end(bench_exports, bits, tolerance):
    """Whole UNet: float-rounding differences flip codes at ties, and flips propagate through later quantizers, so
    the stated tolerance is 2 % (W8A8) / 5 % (W4A4) relative error of the noise prediction, and below the
    simulated model's own error against FP."""
    fp, models = bench_exports
    sim, integer = models[bits]
    x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    for t in (999.0, 519.0, 39.0):
        with torch.no_grad():
            y_sim, y_int, y_fp = sim(x, t).sample, integer(x, t).sample, fp(x, t).sample
        err = rel_err(y_int, y_sim)
        assert err < tolerance, (t, err)
        assert err < rel_err(y_sim, y_fp), (t, err, rel_err(y_sim, y_fp))


@needs_kernels
@needs_exact_kernels
def test_integer_model_samples_in_a_diffusers_pipeline(bench_exports):
    """The loaded integer model is the `unet` of DDIMPipeline; its samples match the simulated model's."""
    _, models = bench_exports
    sim, integer = models[(8, 8)]
    images = {}
    for name, unet in (("sim", sim), ("int", integer)):
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(REPO / "assets" / "teacher" / "scheduler"))
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(batch_size=4, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                            output_type="np").images
    assert images["int"].shape == (4, 32, 32, 1) and np.isfinite(images["int"]).all()
    mse = float(((images["int"] - images["sim"]) ** 2).mean())
    assert 10 * np.log10(1 / max(mse, 1e-12)) > 30, mse  # PSNR of integer vs simulated samples above 30 dB


@needs_kernels
def test_integer_mode_and_set_quantization_refuse_each_other(tmp_path):
    """Integer mode computes on codes: a model with quantization turned off is not silently run quantized, and a
    model in integer mode does not pretend to turn quantization off."""
    from qdistill.quantizers import set_quantization
    from qdistill.quantizers.integer_layers import to_integer

    fp = build_unet("plain-lpb2")
    q = fit_ranges_(quantize_(fp, QuantConfig(weight_bits=8, act_bits=8)), calibration_batches(fp))
    export_model(q, tmp_path / "e", recipe="test")
    off = load_exported(tmp_path / "e", "simulated")
    set_quantization(off, weights=False, activations=True)
    with pytest.raises(ValueError, match="set_quantization turned quantization off in .* module"):
        to_integer(off)
    assert not any(isinstance(m, IntegerLayer) for m in off.modules())  # refused before any layer was swapped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        integer = load_exported(tmp_path / "e", "integer")
    with pytest.raises(ValueError, match="integer mode"):
        set_quantization(integer, weights=False)
