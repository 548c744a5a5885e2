"""What a diffusers denoiser takes and returns, read from its own forward signature.

UNets call their latent input `sample`, transformers (DiT, PixArt, SD3, Flux, ...) `hidden_states`; the timestep
is a keyword in pipelines and sometimes positional in user code; the output is a `.sample` dataclass or a tuple.
Everything that calls a model or reads one call's inputs goes through here, so no stage assumes a UNet.

`example_inputs` builds one batch of the model's inputs from its config, for each family: class labels (DiT, UNet
with `num_class_embeds`), text embeddings (UNet cross-attention, PixArt's captions, SD3/Flux joint attention),
pooled projections (SD3, Flux), Flux's packed latents, `img_ids`/`txt_ids` and guidance, SDXL's and PixArt's
added conditioning. Tracing (layer roles, memory plans, ONNX graphs) runs on these.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

LATENT_NAMES = ("sample", "hidden_states")  # UNets, transformers


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def forward_parameters(model: nn.Module) -> list[str]:
    """The names of `model.forward`'s parameters, in order (without self)."""
    return [p for p in _signature(type(model)).parameters if p != "self"]


def latent_name(model: nn.Module) -> str:
    """The name of the model's noisy-latent input: `sample` or `hidden_states`."""
    params = forward_parameters(model)
    for name in LATENT_NAMES:
        if name in params:
            return name
    raise ValueError(f"{type(model).__name__}.forward takes none of {LATENT_NAMES}: not a diffusers denoiser")


def bound_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """One call's inputs by parameter name, positional ones included (what a forward pre-hook sees)."""
    if not args:
        return kwargs
    return _signature(type(model)).bind_partial(None, *args, **kwargs).arguments


def latent_and_timestep(model: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, object]:
    """The latent input and the timestep of one call (timestep None when the call passes none)."""
    inputs = bound_inputs(model, args, kwargs)
    name = latent_name(model)
    if name not in inputs:
        raise ValueError(f"{type(model).__name__} was called without its {name!r} input")
    return inputs[name], inputs.get("timestep")


def noise_prediction(output) -> torch.Tensor:
    """The prediction in a model's output (a tensor, a tuple, or an output dataclass with `.sample`)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def is_flux(model: nn.Module) -> bool:
    """Flux-style: packed latents [B, tokens, channels] positioned by `img_ids`/`txt_ids`."""
    return "img_ids" in forward_parameters(model)


def latent_size(model: nn.Module, size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The latent's height and width (before Flux's 2×2 packing): `size`, else the config's `sample_size`, else
    64 (Flux has none: 64 latents are 512 px through its VAE)."""
    size = size if size is not None else getattr(model.config, "sample_size", None) or 64
    return (size, size) if isinstance(size, int) else tuple(size)


def latent_shape(model: nn.Module, size: int | tuple[int, int] | None = None) -> tuple[int, ...]:
    """The shape of one sample's latent input (without the batch): [C, H, W], or Flux's packed [H/2·W/2, C]."""
    h, w = latent_size(model, size)
    if is_flux(model):
        return ((h // 2) * (w // 2), model.config.in_channels)
    return (model.config.in_channels, h, w)


def smallest_size(model: nn.Module) -> int:
    """The smallest latent size the model takes (cheap forwards for tracing): one downsampling level per UNet
    block but the last, two patches for a transformer."""
    cfg = model.config
    if latent_name(model) == "sample":
        return 2 ** (len(getattr(cfg, "block_out_channels", (0,))) - 1) * 2
    return 2 * (getattr(cfg, "patch_size", None) or 1) * (2 if is_flux(model) else 1)


def text_dim(model: nn.Module) -> int | None:
    """The width of the text embeddings the model attends to (None: it takes none)."""
    cfg = model.config
    params = forward_parameters(model)
    if "encoder_hidden_states" not in params:
        return None
    for key in ("joint_attention_dim", "caption_channels", "cross_attention_dim"):
        value = getattr(cfg, key, None)
        if value:
            return value if isinstance(value, int) else value[0]
    return None


def example_inputs(model: nn.Module, batch: int = 1, *, size=None, text_tokens: int = 8, seed: int = 0,
                   device=None, dtype=None) -> dict:
    """One batch of `model`'s inputs by name, random (seeded), for every input its family needs. `size` is the
    latent's height/width (default the config's `sample_size`); `device`/`dtype` default to the model's."""
    param = next(model.parameters(), None)
    device = device if device is not None else (param.device if param is not None else "cpu")
    dtype = dtype if dtype is not None else (param.dtype if param is not None else torch.float32)
    cfg, params = model.config, forward_parameters(model)
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    shape = latent_shape(model, size)
    kw = {latent_name(model): randn(batch, *shape),
          "timestep": torch.full((batch,), 500.0).to(device, dtype)}
    dim = text_dim(model)
    if dim:
        kw["encoder_hidden_states"] = randn(batch, text_tokens, dim)
    if "pooled_projections" in params and getattr(cfg, "pooled_projection_dim", None):
        kw["pooled_projections"] = randn(batch, cfg.pooled_projection_dim)
    classes = getattr(cfg, "num_embeds_ada_norm", None) if latent_name(model) == "hidden_states" else \
        getattr(cfg, "num_class_embeds", None)
    if "class_labels" in params and classes:
        kw["class_labels"] = torch.randint(0, classes, (batch,), generator=g).to(device)
    if is_flux(model):
        s = size if size is not None else getattr(cfg, "sample_size", None) or 64
        h, w = ((s, s) if isinstance(s, int) else tuple(s))
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        kw["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)
        kw["txt_ids"] = torch.zeros(text_tokens, 3).to(device, dtype)
        kw["timestep"] = kw["timestep"] / 1000  # Flux pipelines pass σ ∈ [0, 1]; the model scales it by 1000
        if getattr(cfg, "guidance_embeds", False):
            kw["guidance"] = torch.full((batch,), 3.5).to(device, dtype)
    if "added_cond_kwargs" in params:
        if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL-class UNets
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled), "time_ids": randn(batch, 6)}
        elif latent_name(model) == "hidden_states":  # PixArt: resolution and aspect ratio (used at 1024 px only)
            s = shape[-1] * 8
            kw["added_cond_kwargs"] = {"resolution": torch.tensor([[s, s]] * batch).to(device, dtype),
                                       "aspect_ratio": torch.ones(batch, 1).to(device, dtype)}
    return kw


def num_classes(model: nn.Module) -> int | None:
    """How many class labels a class-conditional model takes (None: it takes none): a UNet's `num_class_embeds`,
    a DiT's `num_embeds_ada_norm`."""
    if "class_labels" not in forward_parameters(model):
        return None
    key = "num_class_embeds" if latent_name(model) == "sample" else "num_embeds_ada_norm"
    return getattr(model.config, key, None) or None


def predicted_noise(model: nn.Module, output) -> torch.Tensor:
    """The noise prediction a sampler steps with: the output's prediction, without the learned variance channels a
    DiT/PixArt transformer appends (out_channels = 2 × in_channels; diffusers' pipelines drop them the same way)."""
    pred = noise_prediction(output)
    if latent_name(model) == "sample" or is_flux(model):
        return pred
    cfg = model.config
    return pred[:, :cfg.in_channels] if getattr(cfg, "out_channels", None) == 2 * cfg.in_channels else pred


def model_timestep(model: nn.Module, t):
    """The timestep the model is called with at a scheduler timestep `t`: Flux pipelines pass σ = t / 1000."""
    return t / 1000 if is_flux(model) else t


def model_kwargs(model: nn.Module, latent: torch.Tensor, timestep, text_tokens: int | None = None) -> dict:
    """The latent and timestep as the model takes them, by name; the timestep one per sample (transformers'
    embedders need a 1-D batch of them, as diffusers' pipelines pass). Flux also gets the positions of its packed
    latent tokens (a square grid, as FluxPipeline lays them out) and of its `text_tokens` text tokens."""
    t = torch.as_tensor(timestep, device=latent.device)
    kw = {latent_name(model): latent, "timestep": t.reshape(-1).expand(latent.shape[0]) if t.numel() == 1 else t}
    if is_flux(model):
        side = int(round(latent.shape[1] ** 0.5))
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        kw["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(latent)
        kw["txt_ids"] = torch.zeros(text_tokens or 0, 3).to(latent)
    return kw
