"""Integer mode's CUDA path for linear layers, `torch._int_mm` (int8 × int8 → int32), run on the CPU where PyTorch
has the op: the zero-point algebra and the padding to its shape rules are exact, its layers equal the oneDNN
layers to float rounding, and the whole model stays within integer mode's tolerance of simulated mode (2 %
relative at W8A8, test_export). On CUDA the same code runs the linear layers (scripts/gpu_check.sh)."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import build_unet, calibration_batches, example_inputs, rel_err
from qdistill.export import export_model, load_exported
from qdistill.quantizers import QuantConfig, fit_ranges_, quantize_
from qdistill.quantizers.integer_kernels import int_mm_unavailable_reason, unavailable_reason
from qdistill.quantizers.integer_layers import _IntMMWeights, to_integer

pytestmark = pytest.mark.skipif(int_mm_unavailable_reason() is not None, reason=str(int_mm_unavailable_reason()))


@pytest.mark.parametrize("m,k,n", [(3, 20, 12), (40, 64, 48)])
@pytest.mark.parametrize("qmin,qmax,zero_range", [(0, 255, (100, 160)), (0, 15, (3, 12)), (-128, 127, (0, 1))])
def test_int_mm_weights_are_exact(m, k, n, qmin, qmax, zero_range):
    """Rows below 17, K and N off multiples of 8 (padded), asymmetric 8-bit weights (the shifted path), 4-bit
    ones (q − z in int8) and symmetric ones, against the float product of the dequantized codes (float64)."""
    g = torch.Generator().manual_seed(m + k + qmax)
    codes = torch.randint(qmin, qmax + 1, (n, k), generator=g, dtype=torch.int32)
    zero = torch.randint(*zero_range, (n,), generator=g, dtype=torch.int32)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    qx = torch.randint(0, 256, (m, k), generator=g).to(torch.uint8)
    x_scale, x_zero = 0.02, 131
    got = _IntMMWeights(codes, zero, scale, qmin, qmax, bias, False, None)(qx, x_scale, x_zero)
    x = (qx.double() - x_zero) * x_scale
    w = (codes - zero[:, None]).double() * scale.double()[:, None]
    assert torch.allclose(got.double(), x @ w.T + bias.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
@pytest.mark.parametrize("bits", [(8, 8), (4, 8)])
def test_int_mm_linears_equal_onednn_and_simulated(bits, tmp_path):
    fp = build_unet("attn-lpb1")
    q = fit_ranges_(quantize_(fp, QuantConfig(weight_bits=bits[0], act_bits=bits[1])), calibration_batches(fp))
    export_model(q, tmp_path / "e", recipe="test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onednn = load_exported(tmp_path / "e", "integer")
        int_mm = load_exported(tmp_path / "e", "simulated")
        report = to_integer(int_mm, linear_kernel="int_mm")
    sim = load_exported(tmp_path / "e", "simulated")
    assert report["linear_kernel"] == "int_mm" and report["integer"] == onednn.qdistill_export["integer_report"]["integer"]
    linears = [n for n in report["integer"] if not int_mm.get_submodule(n).is_conv]
    assert len(linears) > 8 and all(isinstance(int_mm.get_submodule(n).weights[0][0][0][2], _IntMMWeights)
                                    for n in linears)
    inputs = {}
    hooks = [int_mm.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n in linears]
    kw = example_inputs(fp, seed=3, timesteps=[500] * 4)
    with torch.no_grad():
        y = int_mm(**kw).sample
        onednn(**kw)  # routes the timesteps into its layers' tables
        for h in hooks:
            h.remove()
        for n in linears:
            assert rel_err(int_mm.get_submodule(n)(inputs[n]), onednn.get_submodule(n)(inputs[n])) < 1e-5, n
        assert rel_err(y, sim(**kw).sample) < 2e-2
