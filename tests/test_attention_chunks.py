"""Quantized attention in blocks of queries (quantizers/attention.py): the same outputs and gradients as all
queries at once, with no more than `chunk_mb` of scores alive in the forward and none kept for backward."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch.utils._python_dispatch import TorchDispatchMode

from qdistill.quantizers import QuantAttnProcessor, QuantConfig, TemporalQuantizer, set_timesteps

BATCH, HEADS, TOKENS, KEYS = 2, 4, 64, 12  # self-attention over 8x8 latents; cross-attention to 12 text tokens


def calibrated_attention(cross: bool) -> Attention:
    """A diffusers Attention with a QuantAttnProcessor whose tables are calibrated on 3 timesteps (float64)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=HEADS, dim_head=8, cross_attention_dim=24 if cross else None).double()
    attn.set_processor(QuantAttnProcessor(4, 8, device=attn.to_q.weight.device, dtype=torch.float64))
    quantizers = [m for m in attn.processor.modules() if isinstance(m, TemporalQuantizer)]
    for q in quantizers:
        q.observing = True
    for t in (999.0, 500.0, 0.0):
        x, context, mask = inputs(cross, seed=int(t))
        set_timesteps(attn, torch.full((BATCH,), t, dtype=torch.float64))
        attn(x, context, mask)
    for q in quantizers:
        q.observing = False
        q.init_from_observations("minmax")
    return attn


def inputs(cross: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, TOKENS, 32, generator=g, dtype=torch.float64)
    if not cross:
        return x, None, None
    mask = torch.zeros(BATCH, 1, KEYS, dtype=torch.float64)  # an additive bias, as UNet2DConditionModel makes it
    mask[0, :, 9:] = -10000.0  # padding in the first prompt: prepare_attention_mask makes it (batch·heads, 1, keys)
    return x, torch.randn(BATCH, KEYS, 24, generator=g, dtype=torch.float64), mask


class LargestScores(TorchDispatchMode):
    """The largest softmax input and output seen: the attention scores of one block of queries."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._softmax, torch.ops.aten.softmax):
            self.elements = max(self.elements, args[0].numel(), out.numel())
        return out


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross-masked"])
def test_blocks_of_queries_give_the_same_outputs_and_gradients(cross):
    whole = calibrated_attention(cross)
    chunked = copy.deepcopy(whole)
    keys = KEYS if cross else TOKENS
    one_block_mb = 4 * BATCH * HEADS * 8 * keys / 2**20  # the fp32 scores of 8 queries
    chunked.processor.chunk_mb = one_block_mb
    assert chunked.processor.query_rows(BATCH * HEADS, TOKENS, keys) == 8  # 8 blocks of 8 queries

    x, context, mask = inputs(cross)
    t = torch.tensor([999.0, 0.0], dtype=torch.float64)  # two timesteps in one batch: two table rows
    results = []
    for attn in (whole, chunked):
        set_timesteps(attn, t)
        xg = x.clone().requires_grad_(True)
        for q in attn.processor.modules():
            if isinstance(q, TemporalQuantizer):
                q.delta.requires_grad_(True)
        saved = []
        with LargestScores() as largest, torch.autograd.graph.saved_tensors_hooks(
                lambda s: saved.append(tuple(s.shape)) or s, lambda s: s):
            out = attn(xg, context, mask)
        out.square().sum().backward()
        grads = [xg.grad] + [p.grad for p in attn.parameters() if p.grad is not None]
        results.append((out.detach(), grads, largest.elements, saved))

    (out_a, grads_a, largest_a, saved_a), (out_b, grads_b, largest_b, saved_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    assert len(grads_a) == len(grads_b) > 8  # x, the projections, the four quantizers' step sizes
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    scores = BATCH * HEADS * TOKENS * keys
    assert largest_a == scores and largest_b == scores // 8
    full, block = (BATCH * HEADS, TOKENS, keys), (BATCH * HEADS, 8, keys)
    assert full in saved_a  # all queries at once: backward keeps the scores
    assert full not in saved_b and block not in saved_b  # in blocks: it recomputes each block's instead


def test_without_gradients_blocks_are_not_checkpointed_and_match():
    whole = calibrated_attention(cross=False)
    chunked = copy.deepcopy(whole)
    chunked.processor.chunk_mb = 1e-3
    x, _, _ = inputs(False)
    t = torch.tensor([500.0, 500.0], dtype=torch.float64)
    with torch.no_grad():
        for attn in (whole, chunked):
            set_timesteps(attn, t)
        torch.testing.assert_close(chunked(x), whole(x), rtol=1e-12, atol=1e-12)
    assert chunked.processor.query_rows(BATCH * HEADS, TOKENS, TOKENS) == 1


def test_the_bound_comes_from_the_quant_config():
    from qdistill.quantizers import quantize_

    from conftest import build_unet

    unet = quantize_(build_unet("attn-lpb1"), QuantConfig(attention_chunk_mb=16))
    processors = [m.processor for m in unet.modules() if isinstance(m, Attention)]
    assert processors and all(p.chunk_mb == 16 for p in processors)
    assert QuantConfig().attention_chunk_mb == 1024
    with pytest.raises(ValueError, match="attention_chunk_mb"):
        QuantConfig(attention_chunk_mb=-1)
