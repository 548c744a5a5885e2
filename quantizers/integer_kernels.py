"""The integer kernels of the `integer` inference mode, and the only module that names a backend
(docs/design.md §5: torch.ao.quantization is moving to torchao, so the choice stays swappable here).

CPU: oneDNN through PyTorch's x86 ops: uint8 activations (per-tensor scale and zero point) times int8 weights
(per-output-channel scales, zero point 0), int32 accumulation, float32 output with the bias added. Codes of
4-bit quantizers are exact in these 8-bit types. The float output (no output requantization) is what keeps
`integer` within float rounding of `simulated`.

CUDA: `torch._int_mm` (int8 × int8 → int32, cuBLASLt) for linear layers; PyTorch offers no CUDA int8
convolution, so convolutions run simulated there. `_int_mm` also runs on the CPU, where the tests check it.
"""
from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

BACKEND = "oneDNN (torch.ops.onednn, x86)"


INT_MM = "torch._int_mm (int8 × int8 → int32)"


def int_mm_unavailable_reason() -> str | None:
    return None if hasattr(torch, "_int_mm") else f"this PyTorch has no {INT_MM}"


def int_mm_linear(a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """int32 a · w_t for int8 a [M, K] and w_t [K_pad, N_pad] (K_pad, N_pad multiples of 8, zero-padded): CUDA's
    cuBLASLt kernel wants M > 16 and K, N multiples of 8, so `a` is zero-padded to fit and the result cut back."""
    m, k = a.shape
    rows, cols = max(m, 17) - m, w_t.shape[0] - k
    if rows or cols:
        a = F.pad(a, (0, cols, 0, rows))
    return torch._int_mm(a, w_t)[:m]


def unavailable_reason() -> str | None:
    """None when the CPU kernels can run here, else why not."""
    if not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        return f"this PyTorch build has no {BACKEND} int8 ops"
    if not torch.backends.mkldnn.is_available():
        return "PyTorch was built without oneDNN (mkldnn)"
    return None


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str] | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if line is None else frozenset(line.split(":", 1)[1].split())


def saturation_reason(flags: frozenset[str] | None = None) -> str | None:
    """Why the int8 products may be inexact on this CPU (or one with x86 `flags`), or None (exact, or unknown).
    Without VNNI (AVX-512 VNNI, AVX-VNNI or AMX), oneDNN's x86 int8 path adds pairs of u8·s8 products in int16
    (vpmaddubsw), which saturates past 32767: 8-bit activation codes near 255 times weights near ±127 do (seen
    on an AVX2-only machine: 33 % error on the bench teacher's time-embedding layer)."""
    flags = _cpu_flags() if flags is None else flags
    if flags is None or {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        return None
    return ("this CPU has no VNNI (AVX-512 VNNI, AVX-VNNI or AMX): oneDNN's int8 path sums u8·s8 pairs in int16, "
            "which saturates, so integer mode can differ from simulated")


def quantize_activation(x: torch.Tensor, inv_scale: torch.Tensor, zero: float, top: int) -> torch.Tensor:
    """uint8 codes clamp(round(x · inv_scale) + zero, 0, top): `fake_quant` stopped before dequantization,
    multiplying by the reciprocal (10× faster than a broadcast division here; a code differs from the
    division's in about 1 of 10⁵ values, by one step, at exact ties)."""
    codes = torch.mul(x, inv_scale).round_().add_(zero).clamp_(0, top)
    if codes.dim() == 4:  # the conv kernel reads NHWC: converting here (in the same copy) saves it a reorder
        return codes.to(torch.uint8, memory_format=torch.channels_last)
    return codes.to(torch.uint8)


def prepack_conv2d(weight: torch.Tensor, scale: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Reorder an int8 [out, in, kh, kw] weight for the kernel (done once, at load)."""
    return torch.ops.onednn.qconv_prepack(weight.to(torch.int8).contiguous(), scale.float(), 1.0, 0, list(stride),
                                          list(padding), list(dilation), groups, None)


def conv2d(qx: torch.Tensor, x_scale: float, x_zero: int, packed: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, stride, padding, dilation, groups: int) -> torch.Tensor:
    """float32 conv output (channels_last) of uint8 input codes; padding is the real value 0."""
    return torch.ops.onednn.qconv2d_pointwise(
        qx, x_scale, x_zero, packed, w_scale, torch.zeros(w_scale.numel(), dtype=torch.int64), bias, list(stride),
        list(padding), list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")


def prepack_linear(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(weight.to(torch.int8).contiguous(), None)


def linear(qx: torch.Tensor, x_scale: float, x_zero: int, packed: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(
        qx, x_scale, x_zero, packed, w_scale, torch.zeros(w_scale.numel(), dtype=torch.int64), bias, 1.0, 0,
        torch.float32, "none", [], "")
