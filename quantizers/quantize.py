"""`quantize_(model, config)`: swap a diffusers denoiser's layers (a UNet or a transformer) for quantized ones,
in place.

The model keeps its class and call signature, so it still runs inside diffusers pipelines. After
`quantize_`, weights are quantized (ranges from the weights alone); activation tables are filled by
`fit_ranges_(model, batches)` from the model's own inputs along sampler trajectories.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from ..denoisers import latent_and_timestep
from .attention import QuantAttnProcessor
from .blocks import ATTENTION_TYPES
from .layer_precision import assign_layer_bits, parse_layer_bits
from .layers import QUANT_LAYERS, LayerSpec, QuantConv2d, QuantLinear
from .routing import set_timesteps
from .sdpa_attention import QuantSDPA
from .temporal import TemporalQuantizer
from .uniform import check_bits


@dataclass
class QuantConfig:
    """What to quantize and how. Every choice of docs/design.md §3.8 is a key here."""

    weight_bits: int = 4
    act_bits: int = 8
    weight_symmetric: bool = False
    act_symmetric: bool = False
    weight_init: Literal["minmax", "mse"] = "mse"
    act_init: Literal["minmax", "mse"] = "mse"
    per_timestep: bool = True  # Temporal Parallel Quantizer; False: one activation scale for all timesteps
    weight_dilation: bool = True
    shortcut_split: bool = True
    quantize_attention: bool = True  # Q, K, V and softmax probabilities
    attention_bits: int | None = None  # bits of Q, K, V; None: act_bits
    softmax_bits: int = 8
    attention_chunk_mb: float = 1024  # attention scores held at once, per attention call (0: no bound)
    first_last_bits: int | None = 8  # first and last conv; None keeps them in floating point
    time_embedding_bits: int | None = 8  # the timestep-embedding MLP; None keeps it in floating point
    # module-name patterns -> bits (8, "W4A8", or null/"fp"), over the rules above (quantizers/layer_precision.py)
    layer_bits: dict[str, int | str | None] = field(default_factory=dict)
    # auto: before quantize_, the most sensitive layers go to keep_sensitive_bits within keep_sensitive_budget
    # (extra bit-operations relative to the rules alone), measured on keep_sensitive_rows calibration rows
    keep_sensitive: Literal["off", "auto"] = "off"
    keep_sensitive_bits: list[int | str | None] = field(default_factory=lambda: ["fp", 8])  # highest first
    keep_sensitive_budget: float = 0.03
    keep_sensitive_rows: int = 256
    # outliers beyond Weight Dilation: a float branch of this rank beside every quantized layer (SVDQuant,
    # quantizers/low_rank.py; 0: off), and one weight (Δ, z) per group of this many input channels for weights
    # at 4 bits or fewer (0: per output channel)
    low_rank: int = 0
    weight_group_size: int = 0

    def __post_init__(self):
        for key in ("weight_bits", "act_bits", "softmax_bits", "attention_bits", "first_last_bits",
                    "time_embedding_bits"):
            value = getattr(self, key)
            if value is not None or key in ("weight_bits", "act_bits", "softmax_bits"):
                check_bits(value, key)
        if not isinstance(self.layer_bits, dict):
            raise ValueError(f"layer_bits must map module-name patterns to bits, got {self.layer_bits!r}")
        for pattern, value in self.layer_bits.items():
            parse_layer_bits(value, f"layer_bits[{pattern!r}]")
        if not isinstance(self.keep_sensitive_bits, (list, tuple)) or not self.keep_sensitive_bits:
            raise ValueError(f"keep_sensitive_bits must be a non-empty list of bits (highest first), got "
                             f"{self.keep_sensitive_bits!r}")
        for value in self.keep_sensitive_bits:
            parse_layer_bits(value, "keep_sensitive_bits")
        if self.keep_sensitive not in ("off", "auto"):
            raise ValueError(f"keep_sensitive must be 'off' or 'auto', got {self.keep_sensitive!r}")
        if not self.keep_sensitive_budget >= 0:
            raise ValueError(f"keep_sensitive_budget must be >= 0 (extra bit-operations, relative), got "
                             f"{self.keep_sensitive_budget}")
        if self.keep_sensitive_rows < 1:
            raise ValueError(f"keep_sensitive_rows must be >= 1, got {self.keep_sensitive_rows}")
        for key in ("low_rank", "weight_group_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0 (0: off), got {value!r}")
        if not self.attention_chunk_mb >= 0:
            raise ValueError(f"attention_chunk_mb must be >= 0 (0: no bound), got {self.attention_chunk_mb}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tag(self) -> str:
        return bits_tag(self.weight_bits, self.act_bits)


def bits_tag(weight_bits: int, act_bits: int) -> str:
    """The name of a bit-width pair, as every table and log writes it: W4A8."""
    return f"W{weight_bits}A{act_bits}"


def _quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def shortcut_splits(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Input-channel split of every up-block layer that eats `concat(h_deep, h_skip)` raw (§3.2).

    Follows the skip tensors of a diffusers UNet: conv_in, every down-block resnet and downsampler push
    one; every up-block resnet pops one and concatenates it after its deep input.
    """
    if not all(hasattr(model, a) for a in ("conv_in", "down_blocks", "up_blocks")):
        return {}
    skips = [model.conv_in.out_channels]
    for block in model.down_blocks:
        skips += [r.out_channels for r in block.resnets]
        skips += [d.out_channels for d in (getattr(block, "downsamplers", None) or [])]
    splits = {}
    for bi, block in enumerate(model.up_blocks):
        for ri, resnet in enumerate(block.resnets):
            deep = resnet.in_channels - skips.pop()
            if getattr(resnet, "conv_shortcut", None) is not None and 0 < deep < resnet.in_channels:
                splits[f"up_blocks.{bi}.resnets.{ri}.conv_shortcut"] = (deep,)
    return splits


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _route_timesteps(model, args, kwargs):
    """Forward pre-hook: give every temporal quantizer the per-sample timesteps of this call (the model's own
    `timestep` input, by keyword or position; one for the batch or one per sample)."""
    sample, timestep = latent_and_timestep(model, args, kwargs)
    if timestep is None:
        raise ValueError(f"{type(model).__name__} was called without a timestep; its quantizers are per timestep")
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1).float()
    if t.numel() not in (1, sample.shape[0]):  # one timestep stands for every row, whatever a layer's batch is
        raise ValueError(f"got {t.numel()} timesteps for a batch of {sample.shape[0]} samples")
    set_timesteps(model, t)


def quantize_(model: nn.Module, config: QuantConfig | None = None, *, init_weights: bool = True) -> nn.Module:
    """Quantize `model` in place and return it (torchao-style). Weights are ready at return;
    activations need `fit_ranges_`. `init_weights=False` builds the quantized structure only, for loaders whose
    saved state replaces the weights, the dilation and every range (Weight Dilation and the weight-range
    search would be thrown away)."""
    config = config or QuantConfig()
    if getattr(model, "qdistill_config", None) is not None:
        raise ValueError("model is already quantized")
    if config.keep_sensitive == "auto":
        raise ValueError("quant.keep_sensitive=auto is chosen from data: resolve it with "
                         "qdistill.analysis.layer_choice.resolve_keep_sensitive(fp_model, config, ...) and quantize_ "
                         "with the config it returns")
    bits = assign_layer_bits(model, config)
    splits = shortcut_splits(model) if config.shortcut_split else {}

    for name, module in _quantizable(model):
        if bits[name] is None:
            continue  # kept in floating point by config
        wbits, abits = bits[name]
        spec = LayerSpec(wbits, abits, config.weight_symmetric, config.act_symmetric, config.per_timestep,
                         config.weight_group_size if wbits is not None and wbits <= 4 else 0, config.low_rank)
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        _set_module(model, name, cls.from_float(module, spec, splits.get(name, ())))

    if config.quantize_attention:
        for module in [m for m in model.modules() if isinstance(m, ATTENTION_TYPES)]:
            w = next(module.parameters())
            args = (config.attention_bits or config.act_bits, config.softmax_bits, config.act_symmetric,
                    config.per_timestep, config.attention_chunk_mb)
            if isinstance(module, Attention) and type(module.processor) in (AttnProcessor, AttnProcessor2_0):
                # the plain computation: our own processor, which integer mode can run on the codes
                module.set_processor(QuantAttnProcessor(*args, device=w.device, dtype=w.dtype))
            else:  # the family's own processor (joint attention, RoPE, QK-norm) stays; its SDPA calls are caught
                QuantSDPA(*args, device=w.device, dtype=w.dtype).install(module)

    for module in model.modules():
        if isinstance(module, QUANT_LAYERS) and init_weights:
            module.split_low_rank()
            if config.weight_dilation:
                module.apply_weight_dilation()
            module.init_weight_quantizers(config.weight_init)

    model.qdistill_config = config
    model.qdistill_hook = model.register_forward_pre_hook(_route_timesteps, with_kwargs=True)
    return model


def set_quantization(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Turn fake quantization of weights and/or activations on or off (dilation stays: it is exact). A model in
    integer mode (`to_integer`) computes on integer codes and cannot: it is refused."""
    integer = next((n for n, m in model.named_modules() if getattr(m, "computes_on_codes", False)), None)
    if integer is not None:
        raise ValueError(f"set_quantization: the model runs in integer mode ({integer} computes on integer codes); "
                         "turn quantization off on a simulated model (load_exported(..., mode='simulated'))")
    for m in model.modules():
        if isinstance(m, TemporalQuantizer):
            m.enabled = activations
        elif isinstance(m, QUANT_LAYERS):
            for q in m.weight_quantizers:
                q.enabled = weights


@torch.no_grad()
def fit_ranges_(model: nn.Module, batches: Iterable[dict], method: str | None = None) -> nn.Module:
    """Fill every activation table from the model's inputs in `batches` (kwargs dicts for `model(**kw)`).

    Statistics are observed on the floating-point chain (weights unquantized), per timestep of each
    sample; each table row is then initialised by `method` (default: the config's `act_init`).
    """
    config = getattr(model, "qdistill_config", None)
    if config is None:
        raise ValueError("fit_ranges_ needs a model prepared by quantize_")
    quantizers = [m for m in model.modules() if isinstance(m, TemporalQuantizer)]
    set_quantization(model, weights=False, activations=False)
    for q in quantizers:
        q.observing = True
    try:
        for kwargs in batches:
            model(**kwargs)
    finally:
        for q in quantizers:
            q.observing = False
        set_quantization(model, weights=True, activations=True)
    for q in quantizers:
        q.init_from_observations(method or config.act_init)
    return model
