"""A second, higher-bit copy of a quantized layer's weight, and the sampler steps that use it.

PTQD's step-aware mixed precision (docs/design.md §3.7, quantizers/mixed_precision.py) may switch weight bits per
step as well as activation bits: a layer then holds its own low-bit weight and this copy (e.g. the FP model's
weight at 8 bits, dilated like the layer's), each with its own per-output-channel quantizers, so an export packs
two sets of integer codes. Which steps use the copy is a table (the schedule's timesteps and, per step, whether
the copy is used); a timestep not in the table takes its nearest entry. Timesteps arrive like the temporal
quantizers' (`set_timesteps`, routed by the model's forward pre-hook), one per sample, so a batch may mix steps.
"""
from __future__ import annotations

import torch
from torch import nn

from .routing import TimestepRouted, nearest_rows, per_sample
from .uniform import UniformQuantizer


class StepWeights(TimestepRouted):
    """The copy's float weight (a buffer: it is not trained), one quantizer per input group, the schedule."""

    def __init__(self, weight: torch.Tensor, input_groups, bits: int, symmetric: bool = False):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.input_groups = [tuple(g) for g in input_groups]
        self.weight_quantizers = nn.ModuleList(
            [UniformQuantizer(bits, symmetric, 0, weight.shape[0], device=weight.device, dtype=weight.dtype)
             for _ in self.input_groups])
        self.register_buffer("timesteps", torch.zeros(1, device=weight.device, dtype=weight.dtype))
        self.register_buffer("use", torch.zeros(1, dtype=torch.bool, device=weight.device))
        self._t: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return self.weight_quantizers[0].bits

    @torch.no_grad()
    def set_schedule(self, timesteps, use) -> None:
        """Per schedule timestep, whether this copy is used."""
        timesteps = torch.as_tensor(timesteps, dtype=self.timesteps.dtype).reshape(-1)
        use = torch.as_tensor(use, dtype=torch.bool).reshape(-1)
        if timesteps.numel() != use.numel() or timesteps.numel() == 0:
            raise ValueError(f"a step-weight schedule needs one flag per timestep, got {use.numel()} flags for "
                             f"{timesteps.numel()} timesteps")
        device = self.weight.device
        self.timesteps, self.use = timesteps.to(device).clone(), use.to(device).clone()  # own storage: one file entry each

    def uses(self, t: torch.Tensor) -> torch.Tensor:
        """Whether each timestep of `t` runs on this copy."""
        return self.use[nearest_rows(t.to(self.timesteps.device), self.timesteps)]

    def current(self, batch: int) -> torch.Tensor:
        """Per row of the current batch, whether it runs on this copy."""
        if self._t is None:
            raise RuntimeError("a layer with step weights needs the timesteps of its batch: call the model (its "
                               "`timestep` argument is routed by quantize_), or set_timesteps(module, t)")
        return per_sample(self.uses(self._t), batch)

    def quant_weight(self) -> torch.Tensor:
        parts = [q(self.weight[:, a:b]) for q, (a, b) in zip(self.weight_quantizers, self.input_groups)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The schedule's length is the saved one.
        saved = state_dict.get(prefix + "timesteps")
        if saved is not None and saved.numel() != self.timesteps.numel():
            self.timesteps = torch.zeros(saved.numel(), device=self.weight.device, dtype=self.timesteps.dtype)
            self.use = torch.zeros(saved.numel(), dtype=torch.bool, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, used on {int(self.use.sum())} of {self.use.numel()} steps"
