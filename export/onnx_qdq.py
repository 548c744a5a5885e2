"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes, one graph per group of timesteps, and a denoiser
that runs those graphs in ONNX Runtime.

    qdistill export run=RUN format=onnx onnx_groups=4      # OUT/ as always, plus OUT/onnx/

Deployment runtimes (ONNX Runtime, TensorRT, OpenVINO) take activation scales as constants of the graph, so the
per-timestep tables (TPQ) become K static sets. The calibrated timesteps are cut into K contiguous groups; each
group gets one (Δ, z) per activation quantizer. The cut minimises, over all quantizers and timesteps, the squared
distance between a timestep's calibrated range ends [Δ(qmin−z), Δ(qmax−z)] and its group's, measured in that
quantizer's mean step; the group's range is the mean of its timesteps' ranges (the minimiser). A quantizer whose
group falls on one row of its table keeps that row exactly. K = 1 is one static set (Q-Diffusion's deployment);
K = the number of calibrated timesteps gives every timestep its own row, as simulated mode does.

Each graph takes the diffusers model's inputs (`sample`, `timestep`, and `encoder_hidden_states` or
`class_labels` where the model has them; any batch size) and returns the noise prediction. Every quantized
layer's input is divided by its Weight Dilation vector, then Clip (fewer than 8 bits) → QuantizeLinear →
DequantizeLinear; its weight is an int8 (symmetric) or uint8 initializer of codes with per-output-channel scales
and zero points → DequantizeLinear; one Conv / MatMul per input group (split shortcuts), summed. Attention's Q, K,
V and probabilities get the same QDQ pair; the rest is the diffusers model as torch.onnx exports it. 4-bit codes
sit in 8-bit containers: ONNX's INT4 types need opset 21, which few runtimes take.

OUT/onnx/onnx_manifest.json records the groups' timesteps, every file's sha256 and size and the inputs.
`OnnxDenoiser(OUT/onnx)` checks the files, opens one ONNX Runtime session per group and is called like the
diffusers model (each sample's group from its timestep), so qdistill's samplers drive it.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..denoisers import latent_name
from ..errors import ExportError
from ..files import atomic_dir, sha256_file
from ..quantizers.attention import QuantAttnProcessor
from ..quantizers.layers import QUANT_LAYERS
from ..quantizers.routing import nearest_rows
from ..quantizers.temporal import TemporalQuantizer
from ..quantizers.uniform import params_from_range, qrange
from ..version import __version__
from .packed import load_exported

logger = logging.getLogger(__name__)

ONNX_DIR, MANIFEST = "onnx", "onnx_manifest.json"
OPSET = 18  # per-axis DequantizeLinear needs 13; 18 is what TensorRT 10, OpenVINO and ORT all take


# -- the two QDQ operations, as custom ops that torch.onnx translates to QuantizeLinear/DequantizeLinear -------
@torch.library.custom_op("qdistill::qdq", mutates_args=())
def qdq(x: torch.Tensor, scale: float, zero: int, qmin: int, qmax: int) -> torch.Tensor:
    """Fake quantization with constant (Δ, z), as simulated mode computes it: a true division, as QuantizeLinear's
    (PyTorch multiplies by the reciprocal where the divisor is a 0-d scalar, which moves codes at near-ties)."""
    step = x.new_full((1,) * x.dim(), scale)
    return torch.round(x / step).add_(zero).clamp_(qmin, qmax).sub_(zero).mul_(scale)


@qdq.register_fake
def _(x, scale, zero, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("qdistill::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: int) -> torch.Tensor:
    """(codes − z) · Δ with one (Δ, z) per index of `axis` (the output channels)."""
    shape = [1] * codes.dim()
    shape[axis] = -1
    return (codes.float() - zero.float().view(shape)) * scale.view(shape)


@dequantize_weight.register_fake
def _(codes, scale, zero, axis):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def require_onnx() -> None:
    """A clear error when the `onnx` extra is not installed."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export and its runtime need {', '.join(missing)}: pip install 'qdistill[onnx]'")


def _container(qmin: int) -> tuple[int, int]:
    return (-128, 127) if qmin < 0 else (0, 255)


def translation_table() -> dict:
    """onnxscript functions for the custom ops: Clip → QuantizeLinear → DequantizeLinear, DequantizeLinear."""
    from onnx import TensorProto, helper
    from onnxscript import opset18 as op

    def const(name, dtype, value):
        return op.Constant(value=helper.make_tensor(name, dtype, [], [value]))

    def qdq_onnx(x, scale: float, zero: int, qmin: int, qmax: int):
        dtype = TensorProto.INT8 if qmin < 0 else TensorProto.UINT8
        s, z = const("scale", TensorProto.FLOAT, scale), const("zero_point", dtype, zero)
        if (qmin, qmax) != _container(qmin):  # fewer than 8 bits: clip to the grid's ends first (exact)
            x = op.Clip(x, const("lo", TensorProto.FLOAT, (qmin - zero) * scale),
                        const("hi", TensorProto.FLOAT, (qmax - zero) * scale))
        return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)

    def dequantize_onnx(codes, scale, zero, axis: int):
        return op.DequantizeLinear(codes, scale, zero, axis=axis)

    return {torch.ops.qdistill.qdq.default: qdq_onnx,
            torch.ops.qdistill.dequantize_weight.default: dequantize_onnx}


# -- timestep groups ----------------------------------------------------------------------------------------
def activation_quantizers(model: nn.Module) -> list[tuple[str, TemporalQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TemporalQuantizer)]


def _row_ranges(q: TemporalQuantizer, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of `q` at each of `timesteps`: the range ends of its table rows there, float64."""
    rows = nearest_rows(timesteps, q.timesteps)
    delta = q.delta.detach().abs().clamp_min(1e-10).double()[rows]
    zero = q.zero.detach().round().double()[rows]
    qmin, qmax = qrange(q.bits, q.symmetric)
    return delta * (qmin - zero), delta * (qmax - zero)


def calibrated_timesteps(model: nn.Module) -> torch.Tensor:
    """Every timestep some activation table has a row for, ascending (empty: no per-timestep tables)."""
    ts = [q.timesteps.detach().double().cpu() for _, q in activation_quantizers(model) if q.timesteps.numel() > 1]
    return torch.cat(ts).unique() if ts else torch.zeros(0, dtype=torch.float64)


def range_features(model: nn.Module, timesteps: torch.Tensor) -> torch.Tensor:
    """[T, 2Q]: each activation quantizer's calibrated range ends at each timestep, in its own mean step."""
    features = []
    for _, q in activation_quantizers(model):
        lo, hi = _row_ranges(q, timesteps)
        step = q.delta.detach().abs().clamp_min(1e-10).double().mean().cpu()
        features += [lo.cpu() / step, hi.cpu() / step]  # in steps: every quantizer weighs alike
    return torch.stack(features, dim=1)


def segment_cost(features: torch.Tensor, a: int, b: int) -> float:
    """Squared distance of rows a..b-1 of `features` to their mean (a group's cost)."""
    f = features[a:b]
    return float(((f - f.mean(0)) ** 2).sum())


def timestep_groups(model: nn.Module, k: int) -> list[list[float]]:
    """The calibrated timesteps cut into at most `k` contiguous groups of least summed `segment_cost`
    (dynamic programming over the cut points)."""
    ts = calibrated_timesteps(model)
    if ts.numel() <= 1 or k == 1:
        return [ts.tolist()]
    n, k = ts.numel(), min(k, ts.numel())
    f = range_features(model, ts)
    cost = [[segment_cost(f, i, j) if j > i else 0.0 for j in range(n + 1)] for i in range(n + 1)]
    best = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for j in range(g, n + 1):
            for i in range(g - 1, j):
                c = best[g - 1][i] + cost[i][j]
                if c < best[g][j]:
                    best[g][j], cut[g][j] = c, i
    bounds, j = [], n
    for g in range(k, 0, -1):
        bounds.append((cut[g][j], j))
        j = cut[g][j]
    return [ts[a:b].tolist() for a, b in reversed(bounds)]


def static_row(q: TemporalQuantizer, group: list[float]) -> tuple[float, int, int, int]:
    """(Δ, z, qmin, qmax) of `q` for the timesteps of `group`: its row where they all fall on one, else the
    grid over the mean of their range ends."""
    if q.timesteps.numel() == 1 or not group:
        rows = torch.zeros(1, dtype=torch.long)
    else:
        rows = nearest_rows(torch.tensor(group, dtype=torch.float64), q.timesteps.detach().cpu())
    if bool((rows == rows[0]).all()):
        r = int(rows[0])
        delta, zero = float(q.delta.detach().abs().clamp_min(1e-10)[r]), int(q.zero.detach().round()[r])
    else:
        lo, hi = _row_ranges(q, torch.tensor(group, dtype=torch.float64))
        d, z = params_from_range(lo.mean().float(), hi.mean().float(), q.bits, q.symmetric)
        delta, zero = float(d), int(z.round())
    qmin, qmax = qrange(q.bits, q.symmetric)
    lo_c, hi_c = _container(qmin)
    if not lo_c <= zero <= hi_c:
        raise ExportError(f"an activation zero point ({zero}) lies outside the 8-bit container [{lo_c}, {hi_c}]: "
                          "ONNX's QuantizeLinear cannot hold it")
    return delta, zero, qmin, qmax


# -- the model as the graph holds it --------------------------------------------------------------------------
class StaticQDQ(nn.Module):
    """An activation quantizer with one constant (Δ, z): QuantizeLinear → DequantizeLinear in the graph."""

    def __init__(self, delta: float, zero: int, qmin: int, qmax: int):
        super().__init__()
        self.delta, self.zero, self.qmin, self.qmax = delta, zero, qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qdq(x, self.delta, self.zero, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"delta={self.delta:.4g}, zero={self.zero}, range=[{self.qmin}, {self.qmax}]"


class QDQLayer(nn.Module):
    """A quantized Conv2d/Linear as the ONNX graph holds it: per input group, the input divided by its dilation
    vector and QDQ'd, the weight as integer codes dequantized per output channel, one Conv/MatMul each, summed;
    the low-rank branch in float on the raw input."""

    def __init__(self, layer: nn.Module, act_rows: list[tuple | None]):
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv and layer.padding_mode != "zeros":
            raise ExportError(f"ONNX export supports zero-padded convolutions; a layer has padding_mode="
                              f"{layer.padding_mode!r}")
        self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups) if self.is_conv else ()
        self.channel_dim = layer.channel_dim
        self.input_groups = list(layer.input_groups)
        self.bias = layer.bias
        self.low_rank = layer.low_rank
        self.act = nn.ModuleList([StaticQDQ(*row) if row is not None else nn.Identity() for row in act_rows])
        self.act_quantized = [row is not None for row in act_rows]
        w = layer.weight.detach()
        for g, (a, b) in enumerate(self.input_groups):
            if self.act_quantized[g]:
                shape = [1] * (4 if self.is_conv else 1)
                shape[1 if self.is_conv else 0] = -1
                self.register_buffer(f"dilation_{g}", layer.dilation_scale[a:b].detach().clone().view(shape))
            if len(layer.weight_quantizers):
                q = layer.weight_quantizers[g]
                if q.group_size:
                    raise ExportError("ONNX export of group-wise weights (quant.weight_group_size) needs blocked "
                                      "DequantizeLinear (opset 21); export with weight_group_size=0")
                codes = q.to_int(w[:, a:b])
                dtype = torch.int8 if q.qmin < 0 else torch.uint8
                codes = codes.to(dtype)
                self.register_buffer(f"codes_{g}", codes if self.is_conv else codes.t().contiguous())
                self.register_buffer(f"scale_{g}", q.delta.detach().abs().clamp_min(1e-10).float().clone())
                self.register_buffer(f"zero_{g}", q.zero.detach().round().to(dtype))
            else:
                self.register_buffer(f"weight_{g}", (w[:, a:b] if self.is_conv else w[:, a:b].t()).clone())

    def _weight(self, g: int) -> torch.Tensor:
        if hasattr(self, f"codes_{g}"):
            return dequantize_weight(getattr(self, f"codes_{g}"), getattr(self, f"scale_{g}"),
                                     getattr(self, f"zero_{g}"), 0 if self.is_conv else 1)
        return getattr(self, f"weight_{g}")

    def _conv_forward(self, x, weight, bias):  # the low-rank branch's convolution (LowRankBranch.forward)
        return F.conv2d(x, weight, bias, *self.conv_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for g, (a, b) in enumerate(self.input_groups):
            xg = x if len(self.input_groups) == 1 else x.narrow(self.channel_dim, a, b - a)
            if self.act_quantized[g]:
                xg = self.act[g](xg / getattr(self, f"dilation_{g}"))
            bias = self.bias if g == 0 else None
            if self.is_conv:
                y = F.conv2d(xg, self._weight(g), bias, *self.conv_args)
            else:
                y = torch.matmul(xg, self._weight(g))
                y = y if bias is None else y + bias
            out = y if out is None else out + y
        if self.low_rank is not None:
            out = out + self.low_rank(x, self)
        return out


def qdq_model(model: nn.Module, group: list[float]) -> nn.Module:
    """A copy of the simulated export `model` with every quantizer static at `group`'s rows: what one graph runs."""
    m = copy.deepcopy(model)
    m._forward_pre_hooks.clear()  # timestep routing: nothing per-timestep is left
    for name, module in list(m.named_modules()):
        if isinstance(module, QUANT_LAYERS):
            if module.step_weights is not None:
                raise ExportError(f"ONNX export of step-aware mixed precision (second weight copies, e.g. {name}) "
                                  "is not supported: export without mixed_precision")
            rows = [static_row(q, group) for q in module.input_quantizers] or [None] * len(module.input_groups)
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child, QDQLayer(module, rows))
        elif isinstance(module, QuantAttnProcessor):
            module.chunk_mb = 0  # one block: the graph holds the whole attention
            for key in ("q_quantizer", "k_quantizer", "v_quantizer", "probs_quantizer"):
                setattr(module, key, StaticQDQ(*static_row(getattr(module, key), group)))
    return m.eval()


def check_exportable(model: nn.Module) -> None:
    for name, q in activation_quantizers(model):
        if bool((q.row_bits != q.bits).any()):
            raise ExportError(f"ONNX export of per-step bit-widths (step-aware mixed precision, {name}) is not "
                              "supported: export without mixed_precision")


# -- export ---------------------------------------------------------------------------------------------------
class _Denoiser(nn.Module):
    """The diffusers model with positional inputs, returning the noise prediction tensor (what the graph holds)."""

    def __init__(self, model: nn.Module, cond_names: list[str]):
        super().__init__()
        self.model, self.cond_names = model, cond_names

    def forward(self, sample, timestep, cond=None):
        kwargs = {self.cond_names[0]: cond} if self.cond_names else {}
        return self.model(sample, timestep, **kwargs, return_dict=False)[0]


def model_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Example inputs of the diffusers model, by name (what the graph's inputs are called)."""
    if latent_name(model) != "sample":
        raise ExportError(f"ONNX export of {type(model).__name__} is not supported yet: UNets only")
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    inputs = {"sample": torch.randn(batch, cfg.in_channels, h, w, generator=g),
              "timestep": torch.randint(0, 1000, (batch,), generator=g).float()}
    if getattr(cfg, "cross_attention_dim", None):
        inputs["encoder_hidden_states"] = torch.randn(batch, 8, cfg.cross_attention_dim, generator=g)
    elif getattr(cfg, "num_class_embeds", None):
        inputs["class_labels"] = torch.randint(0, cfg.num_class_embeds, (batch,), generator=g)
    if getattr(cfg, "addition_embed_type", None):
        raise ExportError(f"ONNX export of models with addition_embed_type={cfg.addition_embed_type!r} (SDXL's "
                          "added conditioning) is not supported")
    return inputs


def export_graph(model: nn.Module, path: Path) -> list[str]:
    """`model` (a diffusers UNet, quantized by qdq_model or not) as one ONNX file at `path`, batch dynamic;
    returns its input names."""
    inputs = model_inputs(model)
    names = list(inputs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {"sample": {0: batch}, "timestep": {0: batch}}
    if len(names) > 2:
        dynamic["cond"] = {0: batch}
    args = tuple(inputs.values())
    wrapper = _Denoiser(model, names[2:]).eval()
    with torch.no_grad():
        program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=OPSET, input_names=names,
                                    output_names=["noise_pred"], external_data=False, verbose=False,
                                    dynamic_shapes=dynamic,
                                    custom_translation_table=translation_table())
    graph = program.model_proto
    for node in graph.graph.node:  # the exporter's per-node stack traces: most of a small model's file, no use here
        del node.metadata_props[:]
    import onnx

    onnx.save(graph, str(path))
    return names


def write_onnx_folder(graphs: list[tuple[nn.Module, list[float]]], out: Path, config: dict, **record) -> dict:
    """Each (model, timesteps) of `graphs` as out/group_K.onnx, and the manifest, written atomically."""
    require_onnx()
    manifest = {"format": "qdistill-onnx", "format_version": 1, "qdistill_version": __version__, "opset": OPSET,
                **record, "config": config, "groups": [], "files": {}}
    with atomic_dir(out) as tmp:
        for k, (model, group) in enumerate(graphs):
            name = f"group_{k}.onnx"
            span = f"timesteps {group[0]:g}..{group[-1]:g}" if group else "all timesteps"
            logger.info(f"ONNX graph {k + 1}/{len(graphs)} ({span}) → {out / name}")
            manifest["inputs"] = export_graph(model, tmp / name)
            manifest["groups"].append({"file": name, "timesteps": group})
            manifest["files"][name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _config(model: nn.Module) -> dict:
    """The diffusers config, as JSON holds it (paths as strings), without qdistill's marker."""
    config = {k: v for k, v in dict(model.config).items() if k != "quantization_config"}
    return json.loads(json.dumps(config, default=str))


def export_onnx(export_dir: str | Path, groups: int = 1, out: str | Path | None = None) -> dict:
    """The qdistill export at `export_dir` as ONNX QDQ graphs, one per timestep group, in `out` (default
    EXPORT/onnx); returns the manifest."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ExportError(f"onnx_groups must be an integer >= 1, got {groups!r}")
    export_dir = Path(export_dir)
    model = load_exported(export_dir, "simulated")
    check_exportable(model)
    cut = timestep_groups(model, groups)
    if len(cut) < groups:
        logger.info(f"{groups} groups asked for; the tables have {len(cut)} timestep(s): {len(cut)} group(s)")
    return write_onnx_folder([(qdq_model(model, group), group) for group in cut],
                             Path(out) if out else export_dir / ONNX_DIR, _config(model),
                             export=str(export_dir), model_class=type(model).__name__, quantized=True)


def export_fp_onnx(model: nn.Module, out: str | Path) -> dict:
    """A float diffusers model as one ONNX graph in the same folder layout (ORT FP32, the baseline)."""
    return write_onnx_folder([(model.eval(), [])], Path(out), _config(model), model_class=type(model).__name__,
                             quantized=False)


# -- running the graphs ---------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict:
    file = folder / MANIFEST
    if not file.is_file():
        raise ExportError(f"{folder} holds no ONNX export ({MANIFEST} not found; qdistill export format=onnx)")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as e:
        raise ExportError(f"{file} is not valid JSON: {e}") from None
    if manifest.get("format") != "qdistill-onnx":
        raise ExportError(f"{file} is not a qdistill ONNX manifest (format {manifest.get('format')!r})")
    return manifest


def open_session(path: Path, threads: int | None = None, recorded: dict | None = None):
    """An ONNX Runtime CPU session on `path`, after checking it against its recorded size and sha256."""
    import onnxruntime as ort

    if not path.is_file():
        raise ExportError(f"ONNX file {path} not found")
    if recorded is not None:
        if path.stat().st_size != recorded.get("bytes") or sha256_file(path) != recorded.get("sha256"):
            raise ExportError(f"{path} is damaged or was replaced: its size or sha256 differs from {MANIFEST}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise ExportError(f"{path} is not a valid ONNX model: {str(e).splitlines()[0]}") from None


class OnnxDenoiser(nn.Module):
    """The ONNX graphs of an export, called like the diffusers model: `denoiser(sample, timestep, ...).sample`.
    Each sample runs the graph of its timestep's group (the group of the nearest calibrated timestep)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        require_onnx()
        folder = Path(folder)
        manifest = read_manifest(folder)
        self.config = FrozenDict(manifest["config"])
        self.input_names = manifest["inputs"]
        self.sessions = [open_session(folder / g["file"], threads, manifest["files"].get(g["file"]))
                         for g in manifest["groups"]]
        self.group_timesteps = [g["timesteps"] for g in manifest["groups"]]
        timesteps, group_of = [], []
        for k, g in enumerate(manifest["groups"]):
            timesteps += g["timesteps"]
            group_of += [k] * len(g["timesteps"])
        self.register_buffer("timesteps", torch.tensor(timesteps, dtype=torch.float64), persistent=False)
        self.register_buffer("group_of", torch.tensor(group_of, dtype=torch.long), persistent=False)

    @property
    def device(self) -> torch.device:  # what diffusers pipelines read: inputs are made on the CPU, in float32
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def groups_for(self, t: torch.Tensor) -> torch.Tensor:
        if self.timesteps.numel() == 0:
            return torch.zeros(t.shape, dtype=torch.long)
        return self.group_of[nearest_rows(t, self.timesteps)]

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None, return_dict=True, **_):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        batch = sample.shape[0]
        t = torch.as_tensor(timestep).reshape(-1).float()
        t = t.expand(batch) if t.numel() == 1 else t
        feeds = {"sample": sample.float(), "timestep": t, "encoder_hidden_states": encoder_hidden_states,
                 "class_labels": class_labels}
        feeds = {k: feeds[k].contiguous().numpy() for k in self.input_names}
        groups = self.groups_for(t.double())
        out = torch.empty(sample.shape, dtype=torch.float32)
        for k in groups.unique().tolist():
            idx = (groups == k).nonzero().squeeze(1).numpy()
            whole = len(idx) == batch
            y = self.sessions[k].run(None, {n: v if whole else v[idx] for n, v in feeds.items()})[0]
            out[torch.from_numpy(idx)] = torch.from_numpy(y)
        return UNet2DOutput(sample=out) if return_dict else (out,)
