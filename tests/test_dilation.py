import copy

import pytest
import torch

from conftest import UNET2D_CONFIGS, UNET_COND_CONFIGS, build_unet, example_inputs, rel_err
from qdistill.quantizers import QUANT_LAYERS, QuantConfig, dilate_weight, dilation_factors, quantize_, set_quantization


@pytest.mark.parametrize("shape", [(8, 6), (8, 6, 3, 3), (4, 16, 1, 1)])
def test_dilation_keeps_every_output_channel_range(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    s = dilation_factors(w)
    dims = tuple(range(1, w.dim()))
    dilated = dilate_weight(w, s)
    assert torch.equal(dilated.amax(dims), w.amax(dims)) and torch.equal(dilated.amin(dims), w.amin(dims))
    assert (s >= 1).all() and (s > 1).any()
    # channels holding some output channel's extreme are saturated: s = 1
    flat = w.flatten(2) if w.dim() > 2 else w[:, :, None]
    holds_extreme = ((flat == flat.amax((1, 2), keepdim=True)) | (flat == flat.amin((1, 2), keepdim=True))).any(2).any(0)
    assert (s[holds_extreme] == 1).all()
    # every unsaturated channel is dilated as far as the ranges allow: some weight touches its row's bound
    shaped = (dilated.flatten(2) if w.dim() > 2 else dilated[:, :, None])
    wmax, wmin = shaped.amax((1, 2), keepdim=True), shaped.amin((1, 2), keepdim=True)
    touches = ((shaped - wmax).abs() <= 1e-6 * wmax.abs()) | ((shaped - wmin).abs() <= 1e-6 * wmin.abs())
    assert touches.any(2).any(0)[~holds_extreme].all()


def test_all_negative_row_keeps_its_max():
    w = torch.tensor([[-1.0, -0.5, -0.25], [0.5, 0.2, -0.1]])
    dilated = dilate_weight(w, dilation_factors(w))
    assert torch.equal(dilated.amax(1), w.amax(1)) and torch.equal(dilated.amin(1), w.amin(1))


@pytest.mark.parametrize("name", list(UNET2D_CONFIGS) + list(UNET_COND_CONFIGS))
def test_dilated_model_equals_original_with_quantization_off(name):
    fp = build_unet(name)
    model = quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=4, act_bits=4, weight_dilation=True))
    set_quantization(model, weights=False, activations=False)
    kw = example_inputs(fp)
    with torch.no_grad():
        assert rel_err(model(**kw).sample, fp(**kw).sample) < 1e-5

    fp_modules = dict(fp.named_modules())
    dilated_channels = 0
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, QUANT_LAYERS) or not layer.can_dilate:
            continue
        original = fp_modules[layer_name].weight
        dims = tuple(range(1, original.dim()))
        for a, b in layer.input_groups:  # shortcut-split layers keep each half's ranges
            assert torch.equal(layer.weight[:, a:b].amax(dims), original[:, a:b].amax(dims)), layer_name
            assert torch.equal(layer.weight[:, a:b].amin(dims), original[:, a:b].amin(dims)), layer_name
        dilated_channels += int((layer.dilation_scale > 1).sum())
    assert dilated_channels > 0
