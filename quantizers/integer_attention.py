"""Integer mode's attention: softmax(QKᵀ)·V with quantized probabilities, computed for a few heads (and queries)
at a time so that the scores stay in cache, on the probabilities' integer codes. Used by QuantAttnProcessor
(UNets, DiT, PixArt) and by QuantSDPA (the SDPA calls of SD3's and Flux's own processors).

Simulated mode materialises batch × heads × queries × keys scores and runs fake quantization over them in
seven passes; on the 35.7M DDPM-CIFAR10 shape (32 heads at 16×16) that was most of integer mode's time beyond
its kernels (BENCHMARKS.md, "Integer mode's glue"). Here each block of probabilities is computed by the caller's
`probabilities(query, key, mask)` (diffusers' own `Attention.get_attention_scores` for QuantAttnProcessor: scale,
upcasting and mask as diffusers does them; SDPA's scaled, masked softmax for QuantSDPA), turned into codes in place
(`clamp(round(p / Δ) + z) − z`, the reciprocal multiplied as in the int8 layers' inputs), multiplied with V, and
the step Δ is applied to the small output instead of the large probabilities. The numbers are simulated mode's
within float rounding; a code can differ by one step where p / Δ lies within float rounding of a tie.
PyTorch has no batched int8 matmul on CPU, so both matmuls run in float on the quantized values.
"""
from __future__ import annotations

import torch

from .uniform import qrange

BLOCK_BYTES = 1 << 20  # scores per block: 1 MiB was fastest of 1–32 MiB on the 2-core EPYC (BENCHMARKS.md)


@torch.no_grad()
def attend(quantizer, probabilities, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor | None:
    """softmax(QKᵀ)·V with the probabilities quantized by `quantizer` (layout [batch·heads, tokens, dim]; the
    mask [batch·heads, 1 or queries, keys]), or None where this path does not apply (quantizer off, samples on
    different table rows, a mask not folded per head): the caller then runs the simulated computation."""
    batch_heads, queries, keys = query.shape[0], query.shape[1], key.shape[1]
    if torch.compiler.is_compiling():
        return _attend_traced(quantizer, probabilities, query, key, value, mask)
    if not quantizer.enabled or quantizer.observing or (mask is not None and mask.shape[0] != batch_heads):
        return None
    rows = quantizer.rows_for(quantizer._current_t(batch_heads))
    row = int(rows[0])
    if not bool((rows == row).all()):  # mixed timesteps (training's batches): the simulated path
        return None
    delta = float(quantizer.delta[row].abs().clamp_min(1e-10))
    zero = float(quantizer.zero[row].round())
    qmin, qmax = qrange(int(quantizer.row_bits[row]), quantizer.symmetric)
    inv = 1.0 / delta
    heads = max(1, BLOCK_BYTES // (4 * queries * keys))
    rows_per_block = queries if heads > 1 else max(1, min(queries, BLOCK_BYTES // (4 * keys)))
    out = value.new_empty(batch_heads, queries, value.shape[-1])
    for a in range(0, batch_heads, heads):
        b = min(batch_heads, a + heads)
        for i in range(0, queries, rows_per_block):
            j = min(queries, i + rows_per_block)
            m = None if mask is None else mask[a:b, i:j] if mask.shape[1] == queries else mask[a:b]
            codes = probabilities(query[a:b, i:j], key[a:b], m).mul_(inv).round_()
            if zero:
                codes.add_(zero).clamp_(qmin, qmax).sub_(zero)
            else:
                codes.clamp_(qmin, qmax)
            out[a:b, i:j] = torch.bmm(codes, value[a:b])
    return out.mul_(delta)


def _attend_traced(quantizer, probabilities, query, key, value, mask) -> torch.Tensor:
    """`attend` for torch.compile: the row gathered as a tensor (one row per call, which compile_integer checks)
    and no blocks: the compiler fuses softmax and the quantization into one pass over the scores."""
    row = quantizer.rows_for(quantizer._current_t(query.shape[0]))[:1]
    delta = quantizer.delta[row].abs().clamp_min(1e-10)
    zero = quantizer.zero[row].round()
    qmin, qmax = quantizer.row_range(row)
    codes = probabilities(query, key, mask).mul(1.0 / delta).round().add(zero)
    codes = torch.minimum(torch.maximum(codes, qmin), qmax).sub(zero)
    return torch.bmm(codes, value).mul(delta)
