"""`integer` inference mode: QuantConv2d / QuantLinear replaced by layers that run real int8 kernels.

Each layer keeps its temporal input quantizers (so the model's timestep routing still picks each sample's
TPQ row), quantizes its input to uint8 codes with that row's (Δ, z) exactly as `fake_quant` does, and calls
the kernel with the layer's integer weight codes. Weight zero points: a 4-bit grid's `q − z` fits in int8,
so the kernel gets `q − z` and zero point 0; an asymmetric 8-bit grid's does not, so the kernel gets
`q − 128` plus one extra output channel of ones that returns Σ x̂ over each window, and the layer subtracts
`Δ_w · (z − 128) · Σ x̂`. Both are exact integer arithmetic; only the final float scaling differs from the
simulated float kernels. A layer with step weights (a second weight copy for some sampler steps) prepacks both
copies; each sample runs on its step's. Group-wise weights run one kernel per input-channel group on the same
activation codes (summed in float); a low-rank branch runs in float on the layer's input and is added.
"""
from __future__ import annotations

import functools
import itertools
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import integer_kernels as kernels
from .attention import QuantAttnProcessor
from .layers import QUANT_LAYERS, QuantConv2d
from .temporal import TemporalQuantizer
from .uniform import qrange


def linear_kernel_for(device: torch.device) -> str:
    """The linear layers' kernel on `device`: oneDNN on the CPU, torch._int_mm on CUDA."""
    return "int_mm" if device.type == "cuda" else "onednn"


def simulated_reason(layer: nn.Module, linear_kernel: str = "onednn") -> str | None:
    """Why `layer` (a QuantConv2d/QuantLinear) cannot run integer kernels here, or None."""
    device = layer.weight.device
    if device.type not in ("cpu", "cuda"):
        return f"integer kernels run on the CPU and CUDA, not on {device.type}"
    if device.type == "cuda" and isinstance(layer, QuantConv2d):
        return "PyTorch has no CUDA int8 convolution: convolutions run simulated on CUDA"
    kernel_missing = (kernels.int_mm_unavailable_reason() if linear_kernel == "int_mm" and not isinstance(
        layer, QuantConv2d) else kernels.unavailable_reason())
    if kernel_missing is not None:
        return kernel_missing
    if len(layer.weight_quantizers) == 0 or len(layer.input_quantizers) == 0:
        return "layers with a floating-point side (weights or activations) have no integer kernel"
    if isinstance(layer, QuantConv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"
                                           or isinstance(layer.padding, str)):
        return "grouped convolutions and non-zero or string padding have no integer kernel here"
    return None


class _IntegerWeights:
    """One slice of input channels' int8 weight, prepacked, with per-output-channel scales, its bias and the
    zero-point correction (None when q − z fits in int8; else the ones channel is appended, with bias 0). `codes`
    are the weight quantizer's integer codes of the slice, `zero`/`scale` its per-output-channel grid. Called
    on activation codes, it returns the layer's float output for the slice."""

    def __init__(self, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                 bias: torch.Tensor | None, is_conv: bool, conv_args):
        shape = (-1,) + (1,) * (codes.dim() - 1)
        self.is_conv, self.conv_args = is_conv, conv_args
        self.out_features, self.kernel_size = codes.shape[0], tuple(codes.shape[2:])
        self.scale = scale.float().contiguous()  # oneDNN reads the scales as a flat array
        self.correction = None
        self.bias = bias
        w = codes - zero.view(shape)
        if int(w.min()) < -128 or int(w.max()) > 127:
            shift = (qmin + qmax + 1) // 2
            w = torch.cat([codes - shift, torch.ones_like(codes[:1])])
            self.correction = self.scale * (zero - shift).float()
            self.scale = torch.cat([self.scale, self.scale.new_ones(1)])
            self.bias = torch.cat([bias if bias is not None else torch.zeros(codes.shape[0]), torch.zeros(1)])
        self.packed = kernels.prepack_conv2d(w, self.scale, *conv_args) if is_conv else kernels.prepack_linear(w)
        self.max_code = int(w.abs().max())
        self.key = _register(self)

    def __call__(self, qx: torch.Tensor, x_scale: float, x_zero: int) -> torch.Tensor:
        if self.is_conv:
            y = kernels.conv2d(qx, x_scale, x_zero, self.packed, self.scale, self.bias, *self.conv_args)
        else:
            y = kernels.linear(qx, x_scale, x_zero, self.packed, self.scale, self.bias)
        if self.correction is None:
            return y
        c = self.out_features
        if self.is_conv:  # one fused pass: y − correction ⊗ Σx̂
            return torch.addcmul(y[:, :c], y[:, c:], self.correction.view(1, -1, 1, 1), value=-1)
        return torch.addcmul(y[..., :c], y[..., c:], self.correction, value=-1)

    def output_like(self, qx: torch.Tensor) -> torch.Tensor:
        """An empty tensor shaped like the output on `qx` (the compiled path's shape propagation)."""
        if not self.is_conv:
            return qx.new_empty(qx.shape[:-1] + (self.out_features,), dtype=torch.float32)
        stride, padding, dilation, _ = self.conv_args
        size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, k, s, p, d in zip(qx.shape[2:], self.kernel_size, stride, padding, dilation)]
        return qx.new_empty((qx.shape[0], self.out_features, *size), dtype=torch.float32).contiguous(
            memory_format=torch.channels_last)


class _IntMMWeights:
    """A linear slice's weight for torch._int_mm: the same interface as _IntegerWeights. Activation codes q_x
    (uint8, zero point z_x) become int8 a = q_x − 128; weight codes become int8 w = q_w − c (c = z_w where q_w − z_w
    fits in int8, else 128), so x̂·ŵ summed over k is Δ_x Δ_w (Σ a·w − e Σ a − z̃ Σ w + K z̃ e) with z̃ = z_x − 128 and
    e = z_w − c: exact in int32, then one float scaling, as the oneDNN path."""

    def __init__(self, codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                 bias: torch.Tensor | None, is_conv: bool, conv_args):
        if is_conv:
            raise ValueError("torch._int_mm runs linear layers only")
        self.out_features, self.in_features = codes.shape
        zero = zero.to(torch.int32)
        w = codes - zero.view(-1, 1)
        shift = zero
        if int(w.min()) < -128 or int(w.max()) > 127:
            shift = torch.full_like(zero, (qmin + qmax + 1) // 2)
            w = codes - shift.view(-1, 1)
        pad_k, pad_n = -self.in_features % 8, -self.out_features % 8
        self.w_t = F.pad(w.t().to(torch.int8), (0, pad_n, 0, pad_k)).contiguous()  # [K_pad, N_pad]
        self.w_sum = w.sum(1).to(torch.int32)  # Σ_k w per output channel
        self.e = (zero - shift).to(torch.int32)  # 0 where q − z fits
        self.has_e = bool(self.e.any())  # decided once: no host sync per call
        self.scale = scale.float()
        self.bias = bias
        self.max_code = int(w.abs().max())
        self.key = _register(self)

    def __call__(self, qx: torch.Tensor, x_scale: float, x_zero: int) -> torch.Tensor:
        lead = qx.shape[:-1]
        a = (qx.reshape(-1, self.in_features).to(torch.int16) - 128).to(torch.int8)
        z = int(x_zero) - 128
        acc = kernels.int_mm_linear(a, self.w_t)[:, :self.out_features]
        acc -= z * self.w_sum
        if self.has_e:
            acc -= a.sum(1, dtype=torch.int32)[:, None] * self.e - self.in_features * z * self.e
        y = acc.float().mul_(self.scale * x_scale)
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.out_features)

    def output_like(self, qx: torch.Tensor) -> torch.Tensor:
        return qx.new_empty(qx.shape[:-1] + (self.out_features,), dtype=torch.float32)


# The compiled path calls the kernels through one opaque custom op, `qdistill::int8_kernel`, with the weights
# named by a key: the prepacked oneDNN weights are not ordinary tensors that torch.compile can trace, and
# Inductor's own qconv lowerings want constant activation scales, while a TPQ row is gathered at run time.
_WEIGHTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _register(weights: _IntegerWeights) -> int:
    key = next(_KEYS)
    _WEIGHTS[key] = weights
    return key


@torch.library.custom_op("qdistill::int8_kernel", mutates_args=())
def int8_kernel(qx: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor, weights: int) -> torch.Tensor:
    return _WEIGHTS[weights](qx, float(x_scale), int(x_zero))


@int8_kernel.register_fake
def _(qx, x_scale, x_zero, weights):
    return _WEIGHTS[weights].output_like(qx)


def _weight_parts(weight: torch.Tensor, quantizer, bias, is_conv: bool, conv_args,
                  kind=_IntegerWeights) -> list[tuple[int, int, _IntegerWeights]]:
    """One input group's weight as (first channel, end channel, int8 weights) per weight group: one part per
    output-channel quantizer, one per input-channel group of a group-wise one (each its own kernel call, summed
    in float, since the groups' scales differ along the summed dimension)."""
    codes = quantizer.to_int(weight).to(torch.int32)
    groups, size = quantizer.num_groups, quantizer.group_size or weight.shape[1]
    zero = quantizer.zero.detach().round().to(torch.int32).view(weight.shape[0], groups)
    scale = quantizer.delta.detach().abs().clamp_min(1e-10).float().view(weight.shape[0], groups)
    parts = []
    for j in range(groups):
        a, b = j * size, min(weight.shape[1], (j + 1) * size)
        parts.append((a, b, kind(codes[:, a:b], zero[:, j], scale[:, j], quantizer.qmin, quantizer.qmax,
                                 bias if j == 0 else None, is_conv, conv_args)))
    return parts


class IntegerLayer(nn.Module):
    """A QuantConv2d or QuantLinear on integer kernels; same inputs, same outputs (float)."""

    computes_on_codes = True  # set_quantization refuses a model holding one (it cannot compute unquantized)

    def __init__(self, layer: nn.Module, linear_kernel: str = "onednn"):
        super().__init__()
        self.is_conv = isinstance(layer, QuantConv2d)
        # linear layers: oneDNN (CPU) or torch._int_mm (CUDA; CPU too, for tests)
        self.kind = _IntMMWeights if linear_kernel == "int_mm" and not self.is_conv else _IntegerWeights
        self.channel_dim = layer.channel_dim
        self.input_groups = list(layer.input_groups)
        self.input_quantizers: nn.ModuleList = layer.input_quantizers  # the TPQ tables; timesteps routed here
        self.step_weights = layer.step_weights  # the schedule of a second weight copy (timesteps routed here)
        self.register_buffer("dilation_scale", layer.dilation_scale.detach().clone())
        self.dilated = bool((self.dilation_scale != 1).any())
        self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups) if self.is_conv else None
        self.out_features = layer.weight.shape[0]
        self.low_rank = layer.low_rank  # SVDQuant's float branch, added to the kernels' output
        bias = layer.bias.detach().float() if layer.bias is not None else None
        # weights[0]: the layer's own, per input group; weights[1]: the step-weight copy's. The bias goes
        # with the first group.
        self.weights = [self._pack(layer.weight, layer.weight_quantizers, bias)]
        if self.step_weights is not None:
            self.weights.append(self._pack(self.step_weights.weight, self.step_weights.weight_quantizers, bias))
        # Per input group and TPQ row: (Δ, zero point, 1 / (Δ · dilation) in the input's layout, top code);
        # codes are shifted to start at 0 (uint8) and the zero point with them. Rows may differ in bits
        # (step-aware mixed precision): each has its own range.
        self.tables = []
        for q, (a, b) in zip(self.input_quantizers, self.input_groups):
            shape = [1] * (4 if self.is_conv else 1)
            shape[self.channel_dim] = -1
            s = self.dilation_scale[a:b].float()
            rows = []
            for d, z, bits in zip(q.delta.detach().abs().clamp_min(1e-10).float(), q.zero.detach().round(),
                                  q.row_bits.tolist()):
                qmin, qmax = qrange(bits, q.symmetric)
                rows.append((float(d), int(z) - qmin, (1.0 / (d * s)).view(shape) if self.dilated else 1.0 / d,
                             qmax - qmin))
            self.tables.append(rows)
        # the same rows as tensors, for the compiled path: (Δ, zero point, 1 / (Δ · dilation), top code) per row
        self.row_tensors = [tuple(torch.stack([torch.as_tensor(r[i], dtype=torch.float32) for r in rows])
                                  for i in range(4)) for rows in self.tables]
        # the largest sum of two u8·s8 products: what an int16 accumulation (CPUs without VNNI) must hold
        self.max_pair_sum = max(2 * max(row[3] for row in rows)
                                * max(iw.max_code for copy in self.weights for _, _, iw in copy[g])
                                for g, rows in enumerate(self.tables))

    def _pack(self, weight: torch.Tensor, quantizers, bias) -> list[list[tuple[int, int, _IntegerWeights]]]:
        w = weight.detach()
        return [_weight_parts(w[:, a:b], q, bias if g == 0 else None, self.is_conv, self.conv_args, self.kind)
                for g, (q, (a, b)) in enumerate(zip(quantizers, self.input_groups))]

    def _parts(self, parts, qx: torch.Tensor, x_scale: float, x_zero: int) -> torch.Tensor:
        """The kernels of one input group's weight parts on its activation codes, summed."""
        if len(parts) == 1:
            return parts[0][2](qx, x_scale, x_zero)
        out = None
        for a, b, iw in parts:
            part = qx.narrow(self.channel_dim, a, b - a)
            part = part.contiguous(memory_format=torch.channels_last) if self.is_conv else part.contiguous()
            y = iw(part, x_scale, x_zero)
            out = y if out is None else out.add_(y)
        return out

    def _group(self, g: int, x: torch.Tensor) -> torch.Tensor:
        quantizer: TemporalQuantizer = self.input_quantizers[g]
        table = self.tables[g]
        # per sample: its TPQ row, and which weight copy its step uses; one kernel call per distinct pair
        keys = quantizer.rows_for(quantizer._current_t(x.shape[0])) * len(self.weights)
        if self.step_weights is not None:
            keys = keys + self.step_weights.current(x.shape[0]).to(keys.device, keys.dtype)
        first = int(keys[0])
        if bool((keys == first).all()):  # the sampler's case: one timestep per call
            delta, zero, inv, top = table[first // len(self.weights)]
            parts = self.weights[first % len(self.weights)][g]
            return self._parts(parts, kernels.quantize_activation(x, inv, zero, top), delta, zero)
        out = None
        for k in keys.unique().tolist():
            idx = (keys == k).nonzero().squeeze(1)
            delta, zero, inv, top = table[k // len(self.weights)]
            parts = self.weights[k % len(self.weights)][g]
            y = self._parts(parts, kernels.quantize_activation(x[idx], inv, zero, top), delta, zero)
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out[idx] = y
        return out

    def _group_traced(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """`_group` for torch.compile: the TPQ row gathered as a tensor, so that one graph serves every step, and
        the kernels called through the custom op. All samples are at one row (compile_integer checks)."""
        quantizer: TemporalQuantizer = self.input_quantizers[g]
        row = quantizer.rows_for(quantizer._current_t(x.shape[0]))[:1]  # a 1-element index: no .item() in the graph
        delta, zero, inv, top = [t[row] for t in self.row_tensors[g]]
        if self.dilated:  # Weight Dilation's per-channel 1 / (Δ · s), in the input's layout
            shape = [1] * x.dim()
            shape[self.channel_dim] = -1
            inv = inv.view(shape)
        codes = torch.mul(x, inv).round_().add_(zero).clamp_(torch.zeros_like(top), top)
        codes = codes.to(torch.uint8, memory_format=torch.channels_last) if self.is_conv else codes.to(torch.uint8)
        out = None
        for a, b, iw in self.weights[0][g]:
            part = codes
            if len(self.weights[0][g]) > 1:
                part = codes.narrow(self.channel_dim, a, b - a)
                part = part.contiguous(memory_format=torch.channels_last) if self.is_conv else part.contiguous()
            y = int8_kernel(part, delta, zero, iw.key)
            out = y if out is None else out + y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        traced = torch.compiler.is_compiling() and self.step_weights is None
        out = None
        for g, (a, b) in enumerate(self.input_groups):
            xg = x if len(self.input_groups) == 1 else x.narrow(self.channel_dim, a, b - a)
            y = self._group_traced(g, xg) if traced else self._group(g, xg)
            out = y if out is None else out + y
        if self.low_rank is not None:
            out = out + self.low_rank(x, self)
        return out

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """The float layer's convolution (zero padding: others have no integer kernel): the low-rank branch's."""
        return F.conv2d(x, weight, bias, *self.conv_args)

    def extra_repr(self) -> str:
        kind = "conv2d" if self.is_conv else "linear"
        return f"{kind}, out={self.out_features}, groups={len(self.input_groups)}, kernel={kernels.BACKEND}"


def channels_last_inputs(model, args, kwargs):
    """Forward pre-hook of an integer model: its 4-D inputs in channels_last (NHWC), the int8 convolutions' own
    layout, so that every op meets one layout. With NCHW inputs each conv's activation codes were transposed
    and its NHWC output met NCHW tensors in adds and concatenations, which on CPU cost more than the kernels
    saved (BENCHMARKS.md, "Integer mode's glue")."""
    def nhwc(v):
        return v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
    return tuple(nhwc(a) for a in args), {k: nhwc(v) for k, v in kwargs.items()}


def to_integer(model: nn.Module, linear_kernel: str | None = None) -> dict:
    """Swap every quantized layer that has an integer kernel here for an IntegerLayer, in place, and run the
    model in channels_last (its float convolutions' weights and its 4-D inputs). `linear_kernel`: "onednn" or
    "int_mm" for the linear layers; default the device's (oneDNN on the CPU, torch._int_mm on CUDA).

    Returns {"integer": [layer names], "simulated": {reason: [names]}, "attention": [names]}; each reason is
    warned once. Attention modules run their matmuls in float on the quantized values (PyTorch has no batched
    int8 matmul on CPU), the probabilities as codes (integer_attention.py).
    """
    off = [n for n, m in model.named_modules() if (isinstance(m, TemporalQuantizer) and not m.enabled) or (
        isinstance(m, QUANT_LAYERS) and any(not q.enabled for q in m.weight_quantizers))]
    if off:
        raise ValueError(f"integer mode runs the model quantized, but set_quantization turned quantization off in "
                         f"{len(off)} module(s) (e.g. {off[0]}): turn it back on, or run the model simulated")
    param = next(model.parameters(), None)
    linear_kernel = linear_kernel or linear_kernel_for(param.device if param is not None else torch.device("cpu"))
    if linear_kernel not in ("onednn", "int_mm"):
        raise ValueError(f"linear_kernel must be 'onednn' or 'int_mm', got {linear_kernel!r}")
    report = {"integer": [], "simulated": {}, "attention": [], "linear_kernel": linear_kernel}
    for name, module in list(model.named_modules()):
        if isinstance(module, QUANT_LAYERS):
            why = simulated_reason(module, linear_kernel)
            if why is None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, IntegerLayer(module, linear_kernel))
                report["integer"].append(name)
            else:
                report["simulated"].setdefault(why, []).append(name)
        elif isinstance(getattr(module, "processor", None), QuantAttnProcessor):
            module.processor.integer = True  # softmax(QKᵀ)·V on the probabilities' codes: integer_attention.py
            report["attention"].append(name)
        elif getattr(module, "sdpa_quantizers", None) is not None:  # SD3/Flux: the processor's own SDPA calls
            module.sdpa_quantizers.integer = True
            report["attention"].append(name)
    model.to(memory_format=torch.channels_last)
    model.qdistill_layout_hook = model.register_forward_pre_hook(channels_last_inputs, with_kwargs=True)
    for why, names in report["simulated"].items():
        warnings.warn(f"qdistill integer mode: {why}; {len(names)} module(s) run simulated "
                      f"(e.g. {names[0]})", stacklevel=2)
    at_risk = [n for n in report["integer"] if model.get_submodule(n).kind is _IntegerWeights
               and model.get_submodule(n).max_pair_sum > 32767]  # oneDNN's int16 pair sums; _int_mm sums in int32
    if at_risk and (why := kernels.saturation_reason()) is not None:
        why = f"{why} ({len(at_risk)} layer(s) with 8-bit codes can, e.g. {at_risk[0]})"
        report["saturation_risk"] = why
        warnings.warn(f"qdistill integer mode: {why}; mode=simulated gives the model's own numbers", stacklevel=2)
    return report


def compile_integer(model: nn.Module) -> nn.Module:
    """torch.compile over an integer model's forward, in place. Its hooks stay eager (timestep routing, layout);
    each layer gathers its TPQ row as a tensor, so one graph serves every sampler step. A batch whose samples are
    at different timesteps (one kernel call per row) runs the eager forward. `model.qdistill_compile` records the
    first compiled call's seconds (compilation included); a new batch size compiles again."""
    quantizer = next((m for m in model.modules() if isinstance(m, TemporalQuantizer)), None)
    eager = model.forward
    compiled = torch.compile(eager, dynamic=False)

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        t = quantizer._t if quantizer is not None else None
        if t is not None and t.numel() > 1 and not bool((t == t[0]).all()):
            return eager(*args, **kwargs)
        if "compile_seconds" in model.qdistill_compile:
            return compiled(*args, **kwargs)
        start = time.perf_counter()
        out = compiled(*args, **kwargs)
        model.qdistill_compile["compile_seconds"] = round(time.perf_counter() - start, 1)  # the first call's
        return out

    model.qdistill_compile = {}

    model.forward = forward
    return model
