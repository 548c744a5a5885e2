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

`keep_sensitive="auto"` chooses more `layer_bits` entries from data (`select_sensitive_layers`): the model is
quantized by the rules above with RTN ranges, each layer's saving (the share of the whole model's
noise-prediction error that leaving only it in FP removes, evaluation/sensitivity.py) is measured on
calibration rows, and, largest saving first, each layer goes to the highest of `keep_sensitive_bits` (default
FP, else 8 bits) that keeps the bit-operations within `keep_sensitive_budget` (0.03: at most 3 % more than the
rules alone). The saving is measured in FP and taken for every option (8-bit layers are close to FP beside 4-bit
ones). The choice is written into the returned config's `layer_bits`, so checkpoints and exports rebuild the same
model.

Bit-operations count each layer's multiply-accumulates × weight bits × activation bits (32 × 32 for FP), as
quantizers/mixed_precision.py does.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from fnmatch import fnmatchcase
from typing import Iterable

import torch
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

from .mixed_precision import FP_BITS, layer_macs
_WA = re.compile(r"W(\d+)A(\d+)", re.IGNORECASE)


def parse_layer_bits(value, key: str) -> tuple[int, int] | None:
    """(weight bits, activation bits) of one `layer_bits` value, or None for floating point."""
    from .uniform import check_bits

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
    from ..denoisers import example_inputs, latent_name, smallest_size
    from ..trainer.block_graph import Lineage
    from .blocks import find_blocks

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


def rule_bit_operations(macs: dict[str, int], bits: dict[str, tuple[int, int] | None]) -> float:
    """BOPs per sample: each layer's MACs × weight bits × activation bits (FP: 32 × 32)."""
    return float(sum(n * (bits[name][0] * bits[name][1] if bits.get(name) else FP_BITS * FP_BITS)
                     for name, n in macs.items()))


def _cost(bits: tuple[int, int] | None) -> int:
    return FP_BITS * FP_BITS if bits is None else bits[0] * bits[1]


def _bits_value(bits: tuple[int, int] | None):
    return "fp" if bits is None else f"W{bits[0]}A{bits[1]}"


@torch.no_grad()
def select_sensitive_layers(fp: nn.Module, config, init_batches: Iterable[dict], batches: Iterable[dict],
                            num_train_timesteps: int = 1000, show_progress: bool = True):
    """`config` with `keep_sensitive="auto"` resolved: (the config with the chosen layers added to `layer_bits`
    and `keep_sensitive="off"`, a report of the choice). `init_batches` calibrate the RTN activation ranges,
    `batches` are the rows the errors are measured on (model-input kwargs dicts, e.g. calibration rows)."""
    from ..evaluation.sensitivity import layer_sensitivity  # evaluation imports this package
    from .quantize import calibrate_, quantize_

    batches = list(batches)
    plain = dataclasses.replace(config, keep_sensitive="off")
    model = calibrate_(quantize_(copy.deepcopy(fp), plain), init_batches).eval()
    sensitivity = layer_sensitivity(fp, model, batches, num_train_timesteps=num_train_timesteps,
                                    show_progress=show_progress)
    del model
    macs = layer_macs(fp, batches[0])
    rules = assign_layer_bits(fp, plain)
    base = rule_bit_operations(macs, rules)
    options = [parse_layer_bits(b, "quant.keep_sensitive_bits") for b in config.keep_sensitive_bits]
    allowed = config.keep_sensitive_budget * base
    chosen, extra = [], 0.0
    layers = [u for u in sensitivity["units"] if u["kind"] == "layer" and u["saving"] > 0]
    for unit in sorted(layers, key=lambda u: -u["saving"]):
        now = rules[unit["name"]]
        for keep in options:  # the highest precision that still fits
            cost = macs.get(unit["name"], 0) * (_cost(keep) - _cost(now))
            if cost > 0 and extra + cost <= allowed * (1 + 1e-9):
                chosen.append({"name": unit["name"], "from": _bits_value(now), "to": _bits_value(keep),
                               "saving": unit["saving"], "extra_bops": cost / base})
                extra += cost
                break
    layer_bits = {**config.layer_bits, **{c["name"]: c["to"] for c in chosen}}
    report = {"budget": config.keep_sensitive_budget, "options": [_bits_value(b) for b in options], "layers": chosen,
              "extra_bops": extra / base, "bops_per_sample": base + extra, "rules_bops_per_sample": base,
              "full_mse": sensitivity["full"]["mse"], "rows": sensitivity["rows"], "units": sensitivity["units"]}
    return dataclasses.replace(config, layer_bits=layer_bits, keep_sensitive="off"), report


def selection_summary(report: dict) -> str:
    """One line: what `select_sensitive_layers` kept, at what cost."""
    kept = ", ".join(f"{c['name']} at {c['to']} ({100 * c['saving']:.1f} %)" for c in report["layers"]) or "no layer"
    return (f"keep_sensitive: {kept} (the error share each alone in FP saves in parentheses), "
            f"+{100 * report['extra_bops']:.2f} % bit-operations (budget {100 * report['budget']:.1f} %)")
