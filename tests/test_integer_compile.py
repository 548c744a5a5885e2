"""Integer mode's compiled path (`load_exported(..., mode="integer", compile=True)`): torch.compile over the
integer model stays within integer mode's end-to-end tolerance (2 % relative error at 8-bit activations,
test_export) of both the eager integer model and simulated mode, one graph serves every timestep, and a batch
of mixed timesteps runs the eager forward. (The compiler's fused arithmetic rounds differently; a code one step
off at a tie propagates, as between integer and simulated mode.)"""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import build_unet, calibration_batches, example_inputs, rel_err
from qdistill.configs.schema import EvalConfig
from qdistill.export import ExportError, export_model, load_exported
from qdistill.quantizers import QuantConfig, fit_ranges_, quantize_
from qdistill.quantizers.integer_kernels import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.mark.parametrize("name,bits", [("attn-lpb1", (8, 8)), ("plain-lpb2", (4, 8))])
def test_compiled_integer_equals_eager_integer_with_one_graph(name, bits, tmp_path):
    """attn-lpb1 at W8A8: attention on codes, asymmetric 8-bit weights (the zero-point correction), Weight
    Dilation; plain-lpb2 at W4A8: split shortcuts, 4-bit weights."""
    fp = build_unet(name)
    q = fit_ranges_(quantize_(fp, QuantConfig(weight_bits=bits[0], act_bits=bits[1])), calibration_batches(fp))
    export_model(q, tmp_path / "e", recipe="test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no VNNI: the saturation note
        eager = load_exported(tmp_path / "e", "integer")
        simulated = load_exported(tmp_path / "e", "simulated")
        compiled = load_exported(tmp_path / "e", "integer", compile=True)
    torch._dynamo.reset()
    with torch.no_grad():
        for i, ts in enumerate(([999] * 4, [500] * 4, [0] * 4)):
            kw = example_inputs(fp, seed=3, timesteps=ts)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):  # the first step's graph serves the rest
                y = compiled(**kw).sample
            assert rel_err(y, eager(**kw).sample) < 2e-2, ts
            assert rel_err(y, simulated(**kw).sample) < 2e-2, ts
        kw = example_inputs(fp, seed=3, timesteps=[999, 500, 500, 0])  # mixed rows: the eager forward
        assert torch.equal(compiled(**kw).sample, eager(**kw).sample)


def test_compile_needs_integer_mode(tmp_path):
    fp = build_unet("plain-lpb2")
    q = fit_ranges_(quantize_(fp, QuantConfig(weight_bits=8, act_bits=8)), calibration_batches(fp))
    export_model(q, tmp_path / "e", recipe="test")
    with pytest.raises(ExportError, match="compile=True"):
        load_exported(tmp_path / "e", "simulated", compile=True)
    with pytest.raises(ValueError, match="compile=true"):
        EvalConfig(model=str(tmp_path / "e"), mode="simulated", compile=True)
