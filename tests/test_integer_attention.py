"""Integer mode's attention (quantizers/integer_attention.py): softmax(QKᵀ)·V on the probabilities' codes, a few
heads and queries at a time, equals the simulated processor within float rounding (float64 here, so no code
flips at ties), in every blocking; mixed timesteps and training fall back to the simulated computation."""
from __future__ import annotations

import pytest
import torch

from qdistill.quantizers import integer_attention, set_timesteps
from test_attention_chunks import BATCH, calibrated_attention, inputs


def run(attn, x, context, mask, integer: bool) -> torch.Tensor:
    attn.processor.integer = integer
    with torch.no_grad():
        return attn(x, context, mask)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross-masked"])
@pytest.mark.parametrize("block_bytes", [1 << 20, 2048, 512], ids=["all-heads", "some-heads", "query-blocks"])
def test_attention_on_codes_equals_simulated(cross, block_bytes, monkeypatch):
    monkeypatch.setattr(integer_attention, "BLOCK_BYTES", block_bytes)
    attn = calibrated_attention(cross)
    x, context, mask = inputs(cross, seed=7)
    for t in (999.0, 500.0, 0.0):
        set_timesteps(attn, torch.full((BATCH,), t, dtype=torch.float64))
        simulated, on_codes = run(attn, x, context, mask, False), run(attn, x, context, mask, True)
        assert not torch.equal(simulated, on_codes)  # the other path ran (Δ applied after P·V rounds differently)
        torch.testing.assert_close(on_codes, simulated, rtol=1e-9, atol=1e-12)


def test_mixed_timesteps_and_gradients_take_the_simulated_path():
    attn = calibrated_attention(cross=False)
    x, context, mask = inputs(False, seed=7)
    set_timesteps(attn, torch.tensor([999.0, 0.0], dtype=torch.float64))  # two table rows in one batch
    assert torch.equal(run(attn, x, context, mask, True), run(attn, x, context, mask, False))
    set_timesteps(attn, torch.full((BATCH,), 500.0, dtype=torch.float64))
    attn.processor.integer = True
    with torch.enable_grad():
        y = attn(x.requires_grad_(), context, mask)
    attn.processor.integer = False
    assert torch.equal(y.detach(), attn(x, context, mask).detach())
