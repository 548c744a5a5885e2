"""Integer codes to bytes and back: two 4-bit (or narrower) codes per byte, one 5–8-bit code per byte.

Codes are stored unsigned, as `q − qmin` (so signed and unsigned grids pack the same way); the low nibble
holds the even element. Packing is exact: `unpack_codes(pack_codes(q, ...), ...) == q`.
"""
from __future__ import annotations

import math

import torch


def bytes_per_code(bits: int) -> float:
    return 0.5 if bits <= 4 else 1.0


def pack_codes(q: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Flat uint8 tensor holding the codes `q` (any shape, values in [qmin, qmin + 2**bits − 1])."""
    u = (q.reshape(-1).to(torch.int32) - qmin)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"codes outside the {bits}-bit grid starting at {qmin}")
    u = u.to(torch.uint8)
    if bits > 4:
        return u
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, qmin: int, shape) -> torch.Tensor:
    """The codes of `pack_codes` as int16, in `shape`."""
    n = math.prod(shape)
    expected = n if bits > 4 else (n + 1) // 2
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"packed {bits}-bit codes of shape {tuple(shape)} need {expected} uint8 values, "
                         f"got {packed.numel()} {packed.dtype}")
    if bits <= 4:
        packed = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n]
    return (packed.to(torch.int16) + qmin).reshape(shape)
