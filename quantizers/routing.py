"""Timestep routing: how each sample's timestep reaches the per-timestep tables inside a model.

`quantize_` installs a forward pre-hook on the model that calls `set_timesteps` with the model's own
`timestep` argument (no counters, no globals); code that runs a single block outside the model (the
distiller) calls `set_timesteps` on that block itself. A table looks its rows up with `nearest_rows`: a
timestep never calibrated takes the nearest calibrated one.
"""
from __future__ import annotations

import torch
from torch import nn


def per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Expand per-sample timesteps to `batch` rows: attention folds heads into the batch (sample-major)."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0] == 0:
        return t.repeat_interleave(batch // t.shape[0])
    raise ValueError(f"activation batch {batch} is not a multiple of the {t.shape[0]} timesteps given")


def nearest_rows(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest `table` timestep for each of `t`."""
    if table.numel() == 1:
        return torch.zeros(t.shape, dtype=torch.long, device=table.device)
    return (t.to(table)[:, None] - table[None, :]).abs().argmin(dim=1)


class TimestepRouted(nn.Module):
    """A module with a per-timestep table: it is handed the current batch's timesteps, one per sample."""

    _t: torch.Tensor | None = None

    def set_timesteps(self, t: torch.Tensor | None) -> None:
        self._t = t


def set_timesteps(module: nn.Module, t: torch.Tensor | None) -> None:
    """Route per-sample timesteps to every per-timestep table inside `module`."""
    for m in module.modules():
        if isinstance(m, TimestepRouted):
            m.set_timesteps(t)
