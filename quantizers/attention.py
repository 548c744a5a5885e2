"""Attention quantization through a diffusers attention processor (docs/design.md §3.8).

The projections to_q/to_k/to_v/to_out are already QuantLinear layers; this processor adds the two
activation-activation matmuls: Q and K before QKᵀ, the softmax probabilities and V before P·V. It is
diffusers' own extension point (`Attention.set_processor`), so the Attention module is untouched. Being
an nn.Module, the processor is registered under the Attention module and its quantizer tables are part
of the model's state dict.

Softmax(QKᵀ) is computed for a block of queries at a time, so that no more than `chunk_mb` MiB of scores exist
at once (heads × queries × keys × batch is 512 MiB per sample at SD-1.5's 64×64 level). With gradients on,
each block is checkpointed: backward recomputes its probabilities instead of keeping all of them.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import integer_attention
from .temporal import TemporalQuantizer


class QuantAttnProcessor(nn.Module):
    """The computation of diffusers' `AttnProcessor`, with Q, K, V and probabilities fake-quantized."""

    def __init__(self, bits: int, softmax_bits: int = 8, symmetric: bool = False, per_timestep: bool = True,
                 chunk_mb: float = 0, device=None, dtype=None):
        super().__init__()
        self.chunk_mb = chunk_mb  # the scores of one block of queries, at most (0: all queries at once)
        self.integer = False  # set by integer mode (to_integer): inference on the codes, integer_attention.py
        like = {"device": device, "dtype": dtype}  # the Attention module's
        self.q_quantizer = TemporalQuantizer(bits, symmetric, per_timestep, **like)
        self.k_quantizer = TemporalQuantizer(bits, symmetric, per_timestep, **like)
        self.v_quantizer = TemporalQuantizer(bits, symmetric, per_timestep, **like)
        self.probs_quantizer = TemporalQuantizer(softmax_bits, False, per_timestep, **like)  # probs ∈ [0, 1]: z = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # An explicit signature: diffusers filters the kwargs it passes by the processor's __call__ parameters.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(self.q_quantizer(query))
        key = attn.head_to_batch_dim(self.k_quantizer(key))
        value = attn.head_to_batch_dim(self.v_quantizer(value))

        hidden_states = attn.batch_to_head_dim(self._attention(attn, query, key, value, attention_mask))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def query_rows(self, batch_heads: int, queries: int, keys: int) -> int:
        return query_rows(self.chunk_mb, batch_heads, queries, keys)

    def _attend(self, attn, query, key, value, mask):
        probs = self.probs_quantizer(attn.get_attention_scores(query, key, mask))
        return torch.bmm(probs, value)

    def _attention(self, attn, query, key, value, mask):
        if self.integer and not torch.is_grad_enabled():
            out = integer_attention.attend(self.probs_quantizer, attn.get_attention_scores, query, key, value, mask)
            if out is not None:
                return out
        rows = self.query_rows(query.shape[0], query.shape[1], key.shape[1])
        if rows >= query.shape[1]:
            return self._attend(attn, query, key, value, mask)
        out = []
        for a in range(0, query.shape[1], rows):
            m = mask if mask is None or mask.shape[1] == 1 else mask[:, a:a + rows]
            if torch.is_grad_enabled():
                out.append(checkpoint(self._attend, attn, query[:, a:a + rows], key, value, m, use_reentrant=False))
            else:
                out.append(self._attend(attn, query[:, a:a + rows], key, value, m))
        return torch.cat(out, dim=1)


def query_rows(chunk_mb: float, batch_heads: int, queries: int, keys: int) -> int:
    """How many queries one block of scores holds: fp32 scores (batch·heads × rows × keys) within chunk_mb
    (0: all queries at once)."""
    if not chunk_mb:
        return queries
    return max(1, min(queries, math.floor(chunk_mb * 2**20 / (4 * batch_heads * keys))))
