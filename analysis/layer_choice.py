"""The sensitivity-driven layer choice: `quant.keep_sensitive=auto` resolved into `quant.layer_bits`.

The model is quantized by the config's rules (quantizers/layer_precision.py) with RTN ranges; each layer's saving
(the share of the whole model's noise-prediction error that leaving only it in FP removes, analysis/sensitivity.py)
is measured on calibration rows; then, largest saving first, each layer goes to the highest of
`keep_sensitive_bits` (default FP, else 8 bits) that keeps the bit-operations (qdistill.cost) within
`keep_sensitive_budget` (0.03: at most 3 % more than the rules alone). The saving is measured in FP and taken
for every option (8-bit layers are close to FP beside 4-bit ones). The choice is written into the returned
config's `layer_bits`, so checkpoints and exports rebuild the same model.

`resolve_keep_sensitive` is the one entry point every stage uses (quantize, sensitivity, train).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..cost import bits_cost, layer_macs, rule_bit_operations
from ..files import atomic_write_text
from ..quantizers.layer_precision import assign_layer_bits, parse_layer_bits
from ..quantizers.quantize import fit_ranges_, quantize_
from .sensitivity import layer_sensitivity

logger = logging.getLogger(__name__)


def _bits_value(bits: tuple[int, int] | None):
    return "fp" if bits is None else f"W{bits[0]}A{bits[1]}"


@torch.no_grad()
def select_sensitive_layers(fp: nn.Module, config, init_batches: Iterable[dict], batches: Iterable[dict],
                            num_train_timesteps: int = 1000, show_progress: bool = True):
    """`config` with `keep_sensitive="auto"` resolved: (the config with the chosen layers added to `layer_bits`
    and `keep_sensitive="off"`, a report of the choice). `init_batches` calibrate the RTN activation ranges,
    `batches` are the rows the errors are measured on (model-input kwargs dicts, e.g. calibration rows)."""
    batches = list(batches)
    plain = dataclasses.replace(config, keep_sensitive="off")
    model = fit_ranges_(quantize_(copy.deepcopy(fp), plain), init_batches).eval()
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
            cost = macs.get(unit["name"], 0) * (bits_cost(keep) - bits_cost(now))
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


def resolve_keep_sensitive(fp: nn.Module, quant, init_batches: Callable[[], Iterable[dict]],
                           measured_batches: Callable[[], Iterable[dict]], num_train_timesteps: int,
                           record: Path | None = None, reuse: bool = False, seed: int = 0,
                           on_rank0: Callable = lambda choose: choose()):
    """`quant` with `keep_sensitive=auto` resolved (any other `quant` is returned as it is).

    `init_batches()` and `measured_batches()` give the rows for RTN's activation ranges and the rows the errors are
    measured on (called only when a choice is made). The choice and its report go to `record` (JSON) when given;
    with `reuse` (a resumed run) an existing record is read instead, so the run goes on with the layers it started
    with. `on_rank0(choose)` runs the choice (default: here); a distributed caller passes one that runs it on rank 0
    and broadcasts the chosen `layer_bits`."""
    if quant.keep_sensitive != "auto":
        return quant

    def choose() -> dict:
        if reuse and record is not None and record.exists():
            return json.loads(record.read_text())["layer_bits"]
        torch.manual_seed(seed)  # RTN's activation-range subsample
        resolved, report = select_sensitive_layers(fp, quant, init_batches(), measured_batches(), num_train_timesteps)
        logger.info(selection_summary(report))
        if record is not None:
            atomic_write_text(record, json.dumps({"layer_bits": resolved.layer_bits, **report}, indent=2))
        return resolved.layer_bits

    return dataclasses.replace(quant, layer_bits=on_rank0(choose), keep_sensitive="off")
