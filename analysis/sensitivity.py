"""Per-layer sensitivity: how much of a quantized model's error each quantized part causes.

A quantization unit is a quantized layer (its weight and input quantizers together) or an attention
processor's Q/K/V/softmax quantizers. For every unit, two runs over the same FP trajectory rows give the
noise-prediction MSE against the FP model:
- only_quantized: that unit quantized, everything else in floating point: the error it causes alone;
- only_fp: everything quantized except that unit: `full - only_fp` is what keeping it in FP would save.
Both are reported over all rows and per timestep bucket. Quantization errors are close to additive when they
are small, so the only_quantized errors of all units sum to roughly the whole model's error at 8 bits (the
test states the tolerance); at 4 bits they interact, and only_fp says more.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..denoisers import noise_prediction
from ..progress import progress
from ..quantizers import QUANT_LAYERS, QuantAttnProcessor
from ..cost import layer_macs


@dataclass
class Unit:
    """One part of a quantized model that is switched on and off as a whole."""

    name: str  # the module's name in the model
    kind: str  # "layer" or "attention"
    bits: str  # W4A8, or A8 (softmax 8) for attention
    quantizers: list[nn.Module] = field(repr=False)


def quantization_units(model: nn.Module) -> list[Unit]:
    """Every quantized layer and attention processor of a quantize_'d model, in module order."""
    units = []
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            wbits, abits = m.spec.weight_bits, m.spec.act_bits
            bits = (f"W{wbits}" if wbits is not None else "W-") + (f"A{abits}" if abits is not None else "A-")
            units.append(Unit(name, "layer", bits, [*m.weight_quantizers, *m.input_quantizers]))
        processor = getattr(m, "processor", None)
        if isinstance(processor, QuantAttnProcessor):
            units.append(Unit(f"{name}.processor", "attention",
                              f"A{processor.q_quantizer.bits} (softmax {processor.probs_quantizer.bits})",
                              [processor.q_quantizer, processor.k_quantizer, processor.v_quantizer,
                               processor.probs_quantizer]))
    return units


def _switch(units: list[Unit], on: Callable[[Unit], bool]) -> None:
    for u in units:
        for q in u.quantizers:
            q.enabled = on(u)


def _prediction(model: nn.Module, kwargs: dict) -> torch.Tensor:
    return noise_prediction(model(**kwargs))


class _BucketMeans:
    """Mean of per-row errors over all rows and within each timestep bucket, accumulated on the device."""

    def __init__(self, buckets: int, num_train_timesteps: int, device):
        self.buckets, self.width = buckets, num_train_timesteps / buckets
        self.sums = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.counts = torch.zeros(buckets, dtype=torch.float64, device=device)

    def add(self, per_row: torch.Tensor, t: torch.Tensor) -> None:
        b = (t.to(per_row.device).double() / self.width).floor().clamp(0, self.buckets - 1).long()
        self.sums.index_add_(0, b, per_row.double())
        self.counts.index_add_(0, b, torch.ones_like(per_row, dtype=torch.float64))

    def result(self) -> dict:
        sums, counts = self.sums.cpu(), self.counts.cpu()
        by_bucket = [(s / c).item() if c > 0 else None for s, c in zip(sums, counts)]
        return {"mse": (sums.sum() / counts.sum()).item(), "by_bucket": by_bucket}


def _row_timesteps(kwargs: dict, rows: int) -> torch.Tensor:
    t = torch.as_tensor(kwargs["timestep"]).reshape(-1).float()
    if t.numel() == 1:
        return t.expand(rows)
    if t.numel() != rows:
        raise ValueError(f"got {t.numel()} timesteps for {rows} output rows")
    return t


@torch.no_grad()
def layer_sensitivity(fp: nn.Module, model: nn.Module, batches: Iterable[dict], buckets: int = 4,
                      num_train_timesteps: int = 1000, show_progress: bool = True) -> dict:
    """The sensitivity report of quantize_'d `model` against its FP original `fp` on `batches` (kwargs dicts
    for `model(**kw)`, e.g. calibration rows). The model's own ranges are used as they are (RTN after
    fit_ranges_, or a trained model); every quantizer is left as it was found.

    Returns {"full": ..., "units": [...] sorted by only_quantized MSE, worst first, "buckets": [[lo, hi], ...]},
    each error as {"mse", "by_bucket"}; a unit also has its share of the summed only_quantized errors and the
    share of the full error that keeping it in FP saves."""
    batches = list(batches)
    if not batches:
        raise ValueError("layer_sensitivity needs at least one batch of model inputs")
    units = quantization_units(model)
    if not units:
        raise ValueError("the model has no quantized layers (quantize_ it first)")
    device = next(model.parameters()).device
    targets = [_prediction(fp, kw) for kw in batches]
    row_t = [_row_timesteps(kw, y.shape[0]) for kw, y in zip(batches, targets)]

    def error(on: Callable[[Unit], bool]) -> dict:
        _switch(units, on)
        acc = _BucketMeans(buckets, num_train_timesteps, device)
        for kw, y, t in zip(batches, targets, row_t):
            acc.add((_prediction(model, kw) - y).pow(2).flatten(1).mean(1), t)
        return acc.result()

    macs = layer_macs(model, batches[0])
    was_enabled = [(q, q.enabled) for u in units for q in u.quantizers]
    try:
        full = error(lambda u: True)
        only_quantized, only_fp = [], []
        for unit in progress(units, "sensitivity: units", disable=not show_progress):
            only_quantized.append(error(lambda u: u is unit))
            only_fp.append(error(lambda u: u is not unit))
    finally:
        for q, enabled in was_enabled:  # the model as it came
            q.enabled = enabled

    summed = sum(e["mse"] for e in only_quantized)
    total_macs = sum(macs.get(u.name, 0) for u in units) or 1
    rows = [{"name": u.name, "kind": u.kind, "bits": u.bits, "macs_share": macs.get(u.name, 0) / total_macs,
             "only_quantized": alone, "only_fp": kept,
             "share": alone["mse"] / summed if summed > 0 else 0.0,
             "saving": (full["mse"] - kept["mse"]) / full["mse"] if full["mse"] > 0 else 0.0}
            for u, alone, kept in zip(units, only_quantized, only_fp)]
    rows.sort(key=lambda r: -r["only_quantized"]["mse"])
    width = num_train_timesteps / buckets
    edges = [[round(b * width), round((b + 1) * width) - 1] for b in range(buckets)]
    return {"rows": sum(y.shape[0] for y in targets), "buckets": edges, "full": full,
            "sum_only_quantized_mse": summed, "units": rows}


def sensitivity_table(report: dict, top: int | None = None) -> str:
    """The report as a Markdown table, worst unit first."""
    edges = [f"t {lo}-{hi}" for lo, hi in report["buckets"]]
    head = ["#", "unit", "kind", "bits", "MACs", "only quantized", "share", "only FP", "saving", *edges]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for i, r in enumerate(report["units"][:top], 1):
        by_bucket = [f"{v:.2e}" if v is not None else "-" for v in r["only_quantized"]["by_bucket"]]
        lines.append("| " + " | ".join([
            str(i), f"`{r['name']}`", r["kind"], r["bits"], f"{100 * r['macs_share']:.1f} %",
            f"{r['only_quantized']['mse']:.3e}", f"{100 * r['share']:.1f} %", f"{r['only_fp']['mse']:.3e}",
            f"{100 * r['saving']:.1f} %", *by_bucket]) + " |")
    full = report["full"]
    lines.append("")
    lines.append(f"Whole model quantized: noise-prediction MSE {full['mse']:.3e} on {report['rows']} rows "
                 f"(by bucket: {', '.join(f'{v:.2e}' if v is not None else '-' for v in full['by_bucket'])}); "
                 f"the only-quantized errors sum to {report['sum_only_quantized_mse']:.3e}.")
    return "\n".join(lines)


def sensitivity_chart(report: dict, path: str | Path, top: int = 20) -> Path:
    """A horizontal bar chart (PNG) of the top units' share of the summed only-quantized error."""
    units = report["units"][:top]
    label_w, bar_w, row_h, pad = 8 * max([len(u["name"]) for u in units] + [10]) + 16, 360, 16, 8
    img = Image.new("RGB", (label_w + bar_w + 70, pad * 2 + row_h * (len(units) + 1)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), "share of the summed only-quantized noise-prediction MSE", fill="black")
    biggest = max([u["share"] for u in units] + [1e-12])
    for i, u in enumerate(units, 1):
        y = pad + i * row_h
        draw.text((pad, y + 2), u["name"], fill="black")
        length = int(bar_w * u["share"] / biggest)
        draw.rectangle([label_w, y + 2, label_w + max(1, length), y + row_h - 3],
                       fill=(200, 80, 60) if u["kind"] == "layer" else (60, 110, 200))
        draw.text((label_w + length + 6, y + 2), f"{100 * u['share']:.1f}%", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def chart_array(path: str | Path) -> np.ndarray:
    """The chart as an HWC uint8 array (for TensorBoard's add_image)."""
    return np.asarray(Image.open(path).convert("RGB"))
