"""Attention quantization for any attention processor: Q, K, V and the softmax probabilities of the
`scaled_dot_product_attention` calls the model's own processor makes (docs/design.md §3.8).

Transformer families compute attention in processors of their own: SD3's joint attention concatenates the text
and image streams, Flux applies RoPE and QK-norm, PixArt masks captions. Rewriting each would fork diffusers.
Instead the attention module keeps its processor; a forward pre-hook enters a torch-function mode that catches
`F.scaled_dot_product_attention` for the length of that module's forward (a forward hook, called even when the
forward raises, leaves it), and the caught call runs with its four operands fake-quantized. What reaches SDPA
is exactly what the processor computed (after RoPE, QK-norm and the joint concatenation), so the quantized
operands are the ones an integer kernel would multiply.

With every quantizer off the call goes to SDPA unchanged, so the wrapped module equals the original exactly.
Integer mode (`to_integer` sets `integer`) runs the softmax on the probabilities' codes a few heads at a time, as
QuantAttnProcessor does (integer_attention.py).
A processor that computes attention without `F.scaled_dot_product_attention` (a flash backend of
`dispatch_attention_fn`, a custom kernel) would silently stay unquantized: that is an error on its first call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from . import integer_attention
from .attention import query_rows
from .temporal import TemporalQuantizer


class _CatchSDPA(TorchFunctionMode):
    def __init__(self, owner: "QuantSDPA"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return self.owner.attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class QuantSDPA(nn.Module):
    """The quantizers of one attention module's SDPA calls (layout [batch, heads, tokens, head dim]); installed by
    `install` as the module's `sdpa_quantizers`, so its tables are in the model's state dict."""

    def __init__(self, bits: int, softmax_bits: int = 8, symmetric: bool = False, per_timestep: bool = True,
                 chunk_mb: float = 0, device=None, dtype=None):
        super().__init__()
        self.chunk_mb = chunk_mb
        self.integer = False  # set by integer mode (to_integer): inference on the probabilities' codes
        like = {"device": device, "dtype": dtype}
        self.q_quantizer = TemporalQuantizer(bits, symmetric, per_timestep, **like)
        self.k_quantizer = TemporalQuantizer(bits, symmetric, per_timestep, **like)
        self.v_quantizer = TemporalQuantizer(bits, symmetric, per_timestep, **like)
        self.probs_quantizer = TemporalQuantizer(softmax_bits, False, per_timestep, **like)  # probs ∈ [0, 1]: z = 0
        self._modes: list[_CatchSDPA] = []
        self._calls = 0

    def install(self, attn: nn.Module) -> None:
        attn.sdpa_quantizers = self
        attn.register_forward_pre_hook(self._enter)
        attn.register_forward_hook(self._leave, always_call=True)

    def _enter(self, attn, args):
        self._calls = 0
        mode = _CatchSDPA(self)
        mode.__enter__()
        self._modes.append(mode)

    def _leave(self, attn, args, output):
        self._modes.pop().__exit__(None, None, None)
        if self._calls == 0 and self._active():
            raise RuntimeError(f"{type(attn).__name__} with {type(getattr(attn, 'processor', None)).__name__} computed "
                               "attention without F.scaled_dot_product_attention, so its Q/K/V/softmax cannot be "
                               "quantized: use diffusers' native attention backend, or quant.quantize_attention=false")

    def _quantizers(self):
        return self.q_quantizer, self.k_quantizer, self.v_quantizer, self.probs_quantizer

    def _active(self) -> bool:
        return any(q.enabled or q.observing for q in self._quantizers())

    def attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        self._calls += 1
        if not self._active():  # exact: the processor's own call
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if dropout_p:
            raise ValueError("quantized attention runs in inference and distillation only (dropout_p must be 0)")
        query, key, value = self.q_quantizer(query), self.k_quantizer(key), self.v_quantizer(value)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        scale = scale if scale is not None else 1 / math.sqrt(query.shape[-1])
        bias = None
        if is_causal:
            keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
            bias = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dtype != torch.bool else \
                torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(~attn_mask, float("-inf"))
            bias = mask if bias is None else bias + mask
        if self.integer and not torch.is_grad_enabled():
            out = self._attend_codes(query, key, value, bias, scale)
            if out is not None:
                return out
        rows = query_rows(self.chunk_mb, query.shape[:-2].numel(), query.shape[-2], key.shape[-2])
        if rows >= query.shape[-2]:
            return self._attend(query, key, value, bias, scale)
        out = []
        for a in range(0, query.shape[-2], rows):
            b = bias if bias is None or bias.shape[-2] == 1 else bias[..., a:a + rows, :]
            part = (query[..., a:a + rows, :], key, value, b, scale)
            out.append(checkpoint(self._attend, *part, use_reentrant=False) if torch.is_grad_enabled()
                       else self._attend(*part))
        return torch.cat(out, dim=-2)

    def _attend(self, query, key, value, bias, scale):
        scores = query @ key.transpose(-1, -2) * scale
        if bias is not None:
            scores = scores + bias
        return self.probs_quantizer(scores.softmax(dim=-1)) @ value


    def _attend_codes(self, query, key, value, bias, scale):
        """integer_attention.attend on [batch·heads, tokens, dim] views; None where it does not apply."""
        if query.dim() != 4:
            return None
        batch, heads, queries, keys = *query.shape[:2], query.shape[-2], key.shape[-2]
        mask = None
        if bias is not None:  # broadcast over batch and heads (a small copy: masks have 1 or `queries` rows)
            bias = bias.expand(batch, heads, *bias.shape[-2:]) if bias.dim() <= 4 else None
            if bias is None or bias.shape[-1] != keys:
                return None
            mask = bias.reshape(batch * heads, *bias.shape[-2:])

        def probabilities(q, k, m):
            scores = torch.bmm(q, k.transpose(-1, -2)).mul_(scale) if m is None else \
                torch.baddbmm(m.to(q.dtype), q, k.transpose(-1, -2), alpha=scale)
            return scores.softmax(dim=-1)

        out = integer_attention.attend(self.probs_quantizer, probabilities, query.reshape(batch * heads, queries, -1),
                                       key.reshape(batch * heads, keys, -1), value.reshape(batch * heads, keys, -1),
                                       mask)
        return None if out is None else out.reshape(batch, heads, queries, -1)
