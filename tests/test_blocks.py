import pytest
import torch
from torch import nn

from conftest import build_unet, example_inputs
from qdistill.quantizers import QuantConfig, find_blocks, quantize_, shortcut_splits


@pytest.mark.parametrize("name", ["attn-lpb1", "xattn-lpb1", "plain-lpb2"])
def test_every_layer_is_in_exactly_one_block(name):
    model = build_unet(name)
    blocks = find_blocks(model)
    owners = {}
    for block in blocks:
        for sub_name, sub in block.module.named_modules():
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                assert id(sub) not in owners, f"{sub_name} in {owners.get(id(sub))} and {block.name}"
                owners[id(sub)] = block.name
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(owners) == len(layers)
    names = [b.name for b in blocks]
    assert "time_embedding" in names and "conv_in" in names
    assert blocks[-1].name == "conv_out"  # the output head; conv_norm_out has nothing quantized
    assert all(model.get_submodule(b.name) is b.module for b in blocks)


def test_blocks_follow_execution_order():
    model = build_unet("attn-lpb1")
    names = [b.name for b in find_blocks(model, example_inputs(model))]
    assert names[:3] == ["time_embedding", "conv_in", "down_blocks.0.resnets.0"]
    mid = [n for n in names if n.startswith("mid_block")]
    assert mid == ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    assert names[-1] == "conv_out"
    cond = build_unet("xattn-lpb1")
    names = [b.name for b in find_blocks(cond, example_inputs(cond))]
    assert names.index("down_blocks.0.resnets.0") < names.index("down_blocks.0.attentions.0") \
        < names.index("down_blocks.0.downsamplers.0")


@pytest.mark.parametrize("name", ["attn-lpb1", "plain-lpb2", "xattn-lpb2"])
def test_shortcut_splits_match_the_concatenations_seen_at_run_time(name):
    model = build_unet(name)
    seen = {}

    def record(block_name):
        def hook(module, args, kwargs):
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            for i, resnet in enumerate(module.resnets):
                seen[f"{block_name}.resnets.{i}.conv_shortcut"] = resnet.in_channels - skips[-1 - i].shape[1]
        return hook

    for i, block in enumerate(model.up_blocks):
        block.register_forward_pre_hook(record(f"up_blocks.{i}"), with_kwargs=True)
    with torch.no_grad():
        model(**example_inputs(model))
    splits = shortcut_splits(model)
    assert splits, "these models have up-block shortcut convs"
    for layer, (deep,) in splits.items():
        assert seen[layer] == deep
    quantize_(model, QuantConfig())
    for layer, (deep,) in splits.items():
        q = model.get_submodule(layer)
        assert q.input_groups == [(0, deep), (deep, q.in_channels)] and len(q.input_quantizers) == 2
