"""The export folder: a quantized model as packed integer weights plus what runs them, self-describing.

    OUT/model.safetensors      per quantized layer and input group: `<layer>.weight.<g>.codes` (uint8, two
                               4-bit codes per byte or one 8-bit code), `.scale` and `.zero_point` (one per
                               output channel); the TPQ tables `<layer>.input_quantizers.<g>.{delta,zero,
                               timesteps}`; `<layer>.dilation_scale` (Weight Dilation); every FP tensor
                               (biases, norms, layers kept in FP) under its own state-dict name; a layer with
                               a second weight copy (step-aware mixed precision, format 2) also has
                               `<layer>.step_weights.weight.<g>.{codes,scale,zero_point}` and the steps that
                               use it, `<layer>.step_weights.{timesteps,use}`; format 3: group-wise weights
                               (`.scale`/`.zero_point` one per output channel and input-channel group, output
                               channel major) and low-rank float branches (`<layer>.low_rank.{up,down}`)
    OUT/quant_config.json      format version, qdistill version, recipe, bits and granularity, every quantized
                               layer (shape, bits, groups, TPQ rows) and every FP layer, source model and hash,
                               sha256 and size of model.safetensors, the size report
    OUT/config.json            the base model's diffusers config, marked as a qdistill export (export/formats.py)
    OUT/scheduler_config.json  the source model's scheduler, when it has one (eval samples with it)
    OUT/noise_correction.safetensors  optional: PTQD's per-step statistics (`timesteps`, `k`, `bias`, `sigma`;
                               quantizers/noise_correction.py), recorded with its sha256 in quant_config.json

`load_exported(OUT, mode)` rebuilds the same diffusers class: `simulated` (float kernels, bit-identical to
the model that was exported) or `integer` (int8 kernels, quantizers/integer_layers.py).
`load_noise_correction(OUT)` reads the PTQD statistics (None when the export has none).
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..quantizers import QuantConfig, quantize_
from ..quantizers.integer_layers import compile_integer, to_integer
from ..quantizers.layers import QUANT_LAYERS
from ..quantizers.noise_correction import NoiseCorrection
from ..quantizers.packing import pack_codes, unpack_codes
from ..quantizers.step_weights import StepWeights
from ..quantizers.uniform import UniformQuantizer
from ..errors import ExportError
from ..files import atomic_dir, sha256_file
from ..version import __version__
from .formats import EXPORT as FORMAT, EXPORT_VERSION as FORMAT_VERSION, build_model, save_model_config

EXPORT_FILE, META_FILE = "model.safetensors", "quant_config.json"
NOISE_CORRECTION_FILE = "noise_correction.safetensors"
MODES = ("simulated", "integer")



def _canonical(q: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, z) exactly as fake quantization uses them: |Δ| floored, z rounded."""
    return q.delta.detach().abs().clamp_min(1e-10).float().cpu(), q.zero.detach().round().float().cpu()


def _pack_weight(prefix: str, weight: torch.Tensor, quantizers, input_groups, state: dict, tensors: dict,
                 size: dict | None = None) -> int:
    """Move the weight `prefix` (and its quantizers' Δ, z) out of `state` into packed codes, per input group,
    in `tensors`; returns the packed bytes (and adds them to `size["by_bits"]` when given)."""
    del state[prefix]
    packed_bytes = 0
    qprefix = prefix.rpartition(".")[0]
    qprefix = f"{qprefix}.weight_quantizers" if qprefix else "weight_quantizers"
    for g, (q, (a, b)) in enumerate(zip(quantizers, input_groups)):
        w = weight.detach()[:, a:b].cpu()
        codes = pack_codes(q.to_int(w), q.bits, q.qmin)
        scale, zero = _canonical(q)
        for key in ("delta", "zero"):
            state.pop(f"{qprefix}.{g}.{key}", None)
        tensors[f"{prefix}.{g}.codes"] = codes
        tensors[f"{prefix}.{g}.scale"] = scale
        tensors[f"{prefix}.{g}.zero_point"] = zero.to(torch.int16)
        group_bytes = codes.numel() + 6 * scale.numel()  # codes, fp32 scale, int16 zero point
        packed_bytes += group_bytes
        if size is not None:
            per_bits = size["by_bits"].setdefault(str(q.bits), {"fp32_bytes": 0, "packed_bytes": 0})
            per_bits["fp32_bytes"] += 4 * w.numel()
            per_bits["packed_bytes"] += group_bytes
    return packed_bytes


def _unpack_weight(prefix: str, quantizers, input_groups, shape: list[int], tensors: dict, state: dict) -> None:
    """The inverse of `_pack_weight`: the dequantized weight and its quantizers' Δ, z into `state`."""
    weight = torch.empty(shape)
    qprefix = prefix.rpartition(".")[0]
    qprefix = f"{qprefix}.weight_quantizers" if qprefix else "weight_quantizers"
    for g, (q, (a, b)) in enumerate(zip(quantizers, input_groups)):
        q: UniformQuantizer
        scale = tensors.pop(f"{prefix}.{g}.scale")
        zero = tensors.pop(f"{prefix}.{g}.zero_point").float()
        codes = unpack_codes(tensors.pop(f"{prefix}.{g}.codes"), q.bits, q.qmin, [shape[0], b - a, *shape[2:]])
        if scale.numel() != q.delta.numel() or zero.numel() != q.delta.numel():
            raise ExportError(f"{prefix}.{g}: {scale.numel()} scales for a quantizer of {q.delta.numel()} rows")
        weight[:, a:b] = (codes.float() - q._broadcast(zero, codes)) * q._broadcast(scale, codes)
        state[f"{qprefix}.{g}.delta"] = scale
        state[f"{qprefix}.{g}.zero"] = zero
    state[prefix] = weight


def _format_version(layers: dict) -> int:
    """The oldest format that holds these layers, so older readers still load what they can run."""
    if any("low_rank" in v or "weight_group_size" in v for v in layers.values()):
        return 3
    return 2 if any("step_weights" in v for v in layers.values()) else 1


@torch.no_grad()
def export_model(model: nn.Module, out_dir: str | Path, *, recipe: str, source_model: str | None = None,
                 source_model_hash: str | None = None, scheduler_config: dict | None = None,
                 noise_correction: NoiseCorrection | None = None, extra: dict | None = None) -> dict:
    """Write `model` (prepared by quantize_, calibrated or trained) to `out_dir` atomically; returns the
    size report (bytes). `noise_correction`: PTQD statistics to store beside the model."""
    config: QuantConfig | None = getattr(model, "qdistill_config", None)
    if config is None:
        raise ExportError("export needs a model prepared by quantize_ (it has no qdistill_config)")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors, layers, fp_layers = {}, {}, []
    size = {"quantized_layers_fp32_bytes": 0, "quantized_layers_packed_bytes": 0, "by_bits": {}}
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS) and len(m.weight_quantizers):
            size["quantized_layers_packed_bytes"] += _pack_weight(f"{name}.weight", m.weight, m.weight_quantizers,
                                                                  m.input_groups, state, tensors, size)
            size["quantized_layers_fp32_bytes"] += 4 * m.weight.numel()
            layers[name] = {
                "kind": "conv2d" if isinstance(m, nn.Conv2d) else "linear",
                "weight_shape": list(m.weight.shape), "input_groups": [list(g) for g in m.input_groups],
                "weight_bits": m.spec.weight_bits, "weight_symmetric": m.spec.weight_symmetric,
                "act_bits": m.spec.act_bits, "act_symmetric": m.spec.act_symmetric,
                "tpq_rows": [int(q.timesteps.numel()) for q in m.input_quantizers],
            }
            if m.spec.weight_group_size:  # one scale and zero point per output channel and group of input channels
                layers[name]["weight_group_size"] = m.spec.weight_group_size
            if m.low_rank is not None:  # SVDQuant's float branch: `<layer>.low_rank.{up,down}` in the file
                layers[name]["low_rank"] = m.low_rank.rank
                size["low_rank_bytes"] = size.get("low_rank_bytes", 0) + 4 * (m.low_rank.up.numel()
                                                                              + m.low_rank.down.numel())
            if m.step_weights is not None:  # the second weight copy of step-aware mixed precision
                sw = m.step_weights
                size["step_weights_packed_bytes"] = size.get("step_weights_packed_bytes", 0) + _pack_weight(
                    f"{name}.step_weights.weight", sw.weight, sw.weight_quantizers, m.input_groups, state, tensors)
                layers[name]["step_weights"] = {"bits": sw.bits, "symmetric": sw.weight_quantizers[0].symmetric,
                                                "steps": int(sw.use.numel()), "steps_used": int(sw.use.sum())}
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, QUANT_LAYERS):
            fp_layers.append(name)
    for key, value in list(state.items()):  # activation tables: canonical (Δ, z), as fake quantization reads them
        if key.endswith(".delta") and key[:-6] + ".zero" in state:
            state[key] = value.abs().clamp_min(1e-10)
            state[key[:-6] + ".zero"] = state[key[:-6] + ".zero"].round()
    tensors.update({k: v.contiguous() for k, v in state.items()})
    meta = {
        "format": FORMAT, "format_version": _format_version(layers),
        "qdistill_version": __version__,
        "model_class": type(model).__name__, "recipe": recipe, "source_model": source_model,
        "source_model_hash": source_model_hash, "quant_config": config.to_dict(),
        "granularity": {"weights": "per output channel", "activations": "per tensor, one row per calibrated "
                        "timestep" if config.per_timestep else "per tensor, one for all timesteps"},
        "layers": layers, "fp_layers": fp_layers, **(extra or {}),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_model_config(model, tmp, FORMAT, meta["format_version"])
        save_file(tensors, str(tmp / EXPORT_FILE), metadata={"format": FORMAT})
        if scheduler_config is not None:
            (tmp / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
        size["file_bytes"] = (tmp / EXPORT_FILE).stat().st_size
        size["fp32_model_bytes"] = 4 * sum(p.numel() for p in model.parameters())
        size["quantized_layers_ratio"] = size["quantized_layers_packed_bytes"] / max(1, size["quantized_layers_fp32_bytes"])
        for per_bits in size["by_bits"].values():
            per_bits["ratio"] = per_bits["packed_bytes"] / per_bits["fp32_bytes"]
        meta["size"] = size
        meta["files"] = {EXPORT_FILE: {"sha256": sha256_file(tmp / EXPORT_FILE), "bytes": size["file_bytes"]}}
        if noise_correction is not None:
            save_file(noise_correction.to_state_dict(), str(tmp / NOISE_CORRECTION_FILE), metadata={"format": FORMAT})
            meta["files"][NOISE_CORRECTION_FILE] = {"sha256": sha256_file(tmp / NOISE_CORRECTION_FILE),
                                                    "bytes": (tmp / NOISE_CORRECTION_FILE).stat().st_size}
            meta["noise_correction"] = {"method": "ptqd", "file": NOISE_CORRECTION_FILE,
                                        "steps": int(noise_correction.timesteps.numel()),
                                        "channels": noise_correction.num_channels}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return size


def read_export_meta(path: str | Path) -> dict:
    path = Path(path)
    for name in (META_FILE, EXPORT_FILE, "config.json"):
        if not (path / name).is_file():
            raise ExportError(f"export folder {path} lacks {name}")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except ValueError as e:
        raise ExportError(f"{path / META_FILE} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path / META_FILE} is not a qdistill export (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path} is export format {meta['format_version']}; this qdistill reads up to {FORMAT_VERSION}")
    return meta


def _load_checked(path: Path, name: str, meta: dict) -> dict[str, torch.Tensor]:
    """The tensors of `path/name`, after checking its size and sha256 against quant_config.json."""
    file = path / name
    recorded = meta.get("files", {}).get(name, {})
    if not file.is_file():
        raise ExportError(f"export folder {path} lacks {name}")
    if file.stat().st_size != recorded.get("bytes"):
        raise ExportError(f"{file} is truncated or was replaced: {file.stat().st_size} bytes, "
                          f"{META_FILE} records {recorded.get('bytes')}")
    if sha256_file(file) != recorded.get("sha256"):
        raise ExportError(f"{file} was modified after export: its sha256 differs from the one in {META_FILE}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{file} is corrupted or truncated: {e}") from None


def load_noise_correction(path: str | Path) -> NoiseCorrection | None:
    """The export's PTQD statistics, checked like the model file; None when it was exported without them."""
    path = Path(path)
    meta = read_export_meta(path)
    if "noise_correction" not in meta:
        return None
    tensors = _load_checked(path, NOISE_CORRECTION_FILE, meta)
    try:
        return NoiseCorrection.from_state_dict(tensors)
    except (KeyError, ValueError) as e:
        raise ExportError(f"{path / NOISE_CORRECTION_FILE} does not hold valid noise-correction statistics: "
                          f"{e}") from None


@torch.no_grad()
def load_exported(path: str | Path, mode: str = "simulated", device=None, dtype=None, compile: bool = False):
    """The exported model as its diffusers class, quantized, in `mode` ('simulated' or 'integer'), on `device` in
    `dtype` (simulated mode; integer mode runs oneDNN's int8 kernels on the CPU, and on CUDA torch._int_mm for
    linear layers, convolutions simulated). `compile=True` (integer mode)
    runs the forward through torch.compile, one graph for every timestep; the first call compiles (minutes).

    The weights are rebuilt from their integer codes; the file is checked against its recorded sha256.
    The returned model's `qdistill_export` holds the export's metadata (and in integer mode, which layers
    run integer kernels)."""
    if mode not in MODES:
        raise ExportError(f"mode must be one of {MODES}, got {mode!r}")
    if compile and mode != "integer":
        raise ExportError(f"compile=True is the integer mode's compiled path; got mode={mode!r}")
    if mode == "integer" and (torch.device(device).type if device is not None else "cpu") not in ("cpu", "cuda"):
        raise ExportError(f"mode=integer runs int8 kernels on the CPU (oneDNN) and CUDA (torch._int_mm); on {device} "
                          "use mode=simulated")
    path = Path(path)
    meta = read_export_meta(path)
    file = path / EXPORT_FILE
    tensors = _load_checked(path, EXPORT_FILE, meta)
    try:
        cls = getattr(diffusers, meta["model_class"])
        config = QuantConfig(**meta["quant_config"])
        model = build_model(cls, path, device, dtype)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ExportError(f"{path / META_FILE} or config.json does not describe a model: {e}") from None
    quantize_(model, config, init_weights=False)  # the state below replaces weights and ranges
    state = {}
    try:
        for name, spec in meta["layers"].items():
            m = model.get_submodule(name)
            if ([list(g) for g in m.input_groups] != spec["input_groups"] or list(m.weight.shape) != spec["weight_shape"]
                    or (m.low_rank.rank if m.low_rank is not None else 0) != spec.get("low_rank", 0)
                    or m.spec.weight_group_size != spec.get("weight_group_size", 0)):
                raise ExportError(f"{path / META_FILE}: layer {name} does not match the model its config builds")
            _unpack_weight(f"{name}.weight", m.weight_quantizers, m.input_groups, spec["weight_shape"], tensors, state)
            if "step_weights" in spec:
                sw = spec["step_weights"]
                m.step_weights = StepWeights(torch.empty_like(m.weight), m.input_groups, sw["bits"],
                                             sw["symmetric"])
                _unpack_weight(f"{name}.step_weights.weight", m.step_weights.weight_quantizers, m.input_groups,
                               spec["weight_shape"], tensors, state)
    except (KeyError, ValueError, AttributeError) as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(f"{file} does not hold the layers {META_FILE} lists: {e}") from None
    state.update(tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{file} does not fit a {cls.__name__} quantized as {META_FILE} says: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    model.qdistill_export = dict(meta, mode=mode, path=str(path))
    if mode == "integer":
        model.qdistill_export["integer_report"] = to_integer(model)
        if compile:
            compile_integer(model)
    return model
