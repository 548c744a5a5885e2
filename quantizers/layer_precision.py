"""Per-layer precision: which bits every Conv2d/Linear gets, by rule, by pattern, or from measured sensitivity.

The rules, in order (a later one overrides an earlier one):
1. every layer at `weight_bits`/`act_bits`;
2. by role (`layer_roles`): the input layer (conv_in, the patch embedding, Flux's x_embedder) and the output layer
   (conv_out, proj_out) at `first_last_bits`; the timestep and conditioning embedders (every TimestepEmbedding, and
   the layers outside the model's blocks that read no latent: caption/context projections, pooled-text
   embedders, PixArt's adaLN-single, DiT's output modulation) at `time_embedding_bits`;
3. `layer_bits`: module-name patterns (fnmatch; a pattern also covers the layers inside the module it names)
   to bits: an int n for WnAn, "W4A8", or None / "fp" for floating point; the last matching pattern wins, and
   a pattern that matches no layer is an error (a typo would otherwise quantize what it meant to keep).

`keep_sensitive="auto"` chooses more `layer_bits` entries from data; that needs a model and calibration rows,
so it lives above this package (qdistill.analysis.layer_choice) and resolves into `layer_bits` before quantize_.
"""
from __future__ import annotations

import re
from fnmatch import fnmatchcase

import torch
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

from ..denoisers import example_inputs, latent_name, smallest_size
from ..lineage import Lineage
from .blocks import find_blocks
from .uniform import check_bits
_WA = re.compile(r"W(\d+)A(\d+)", re.IGNORECASE)


def parse_layer_bits(value, key: str) -> tuple[int, int] | None:
    """(weight bits, activation bits) of one `layer_bits` value, or None for floating point."""
    if value is None or (isinstance(value, str) and value.lower() == "fp"):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        bits = (value, value)
    elif isinstance(value, str) and _WA.fullmatch(value.strip()):
        bits = tuple(int(b) for b in _WA.fullmatch(value.strip()).groups())
    else:
        raise ValueError(f"{key}: {value!r} is not bits (an int such as 8, a string such as 'W4A8', or null/'fp' "
                         f"for floating point)")
    for b in bits:
        check_bits(b, key)
    return bits


def _covers(pattern: str, name: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


@torch.no_grad()
def layer_roles(model: nn.Module) -> dict[str, str]:
    """Every Conv2d/Linear of `model` (module order) to its role: "input", "output", "embedding" or "body".

    Found by following one small forward (denoisers.example_inputs) with the latent input labelled: the input
    layer is the first layer called on a value derived from the latent, the output layer the last layer called;
    an embedding layer is inside a TimestepEmbedding, or reads no latent-derived value and sits outside the
    model's blocks (quantizers/blocks.py). The same rules name conv_in/conv_out in a UNet, pos_embed.proj/proj_out
    in DiT, PixArt and SD3, x_embedder/proj_out in Flux, whatever order the modules were registered in."""
    layers = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layers to quantize")
    kwargs = example_inputs(model, 1, size=smallest_size(model))
    mode, calls = Lineage(), []
    mode.mark(kwargs[latent_name(model)], frozenset((0,)))
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.append((n, bool(mode.of(args)))))
             for m, n in layers.items()]
    try:
        with mode:
            model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    reads = dict(reversed(calls))  # a layer called more than once: its first call
    containers = [b.name for b in find_blocks(model) if not isinstance(b.module, (nn.Conv2d, nn.Linear, TimestepEmbedding))]
    embedders = [n for n, m in model.named_modules() if isinstance(m, TimestepEmbedding)]
    first = next((n for n, latent in calls if latent), None)
    roles = {}
    for name in layers.values():
        if name == first:
            roles[name] = "input"
        elif calls and name == calls[-1][0]:
            roles[name] = "output"
        elif any(name.startswith(p + ".") for p in embedders) or (
                name in reads and not reads[name] and not any(name.startswith(c + ".") for c in containers)):
            roles[name] = "embedding"
        else:
            roles[name] = "body"
    return roles


def assign_layer_bits(model: nn.Module, config) -> dict[str, tuple[int, int] | None]:
    """Every Conv2d/Linear of `model` (module order) to its (weight bits, activation bits), or None for FP, by
    `config`'s rules (module docstring)."""
    roles = layer_roles(model)
    layers = list(roles)
    by_role = {"input": config.first_last_bits, "output": config.first_last_bits,
               "embedding": config.time_embedding_bits}
    bits: dict[str, tuple[int, int] | None] = {}
    for name, role in roles.items():
        if role in by_role:
            bits[name] = None if by_role[role] is None else (by_role[role],) * 2
        else:
            bits[name] = (config.weight_bits, config.act_bits)
    for pattern, value in config.layer_bits.items():
        matched = [n for n in layers if _covers(pattern, n)]
        if not matched:
            raise ValueError(f"quant.layer_bits pattern {pattern!r} matches no Conv2d/Linear layer of "
                             f"{type(model).__name__} (e.g. {', '.join(layers[:3])})")
        for n in matched:
            bits[n] = parse_layer_bits(value, f"quant.layer_bits[{pattern!r}]")
    return bits
