"""Temporal Parallel Quantizer (DilateQuant; docs/design.md §3.4).

An activation quantizer holding a table of (Δ, z), one row per calibrated timestep. Every sample in a
batch uses the row of its own timestep (a gather by index), so one batch may mix timesteps and all
timesteps train at once. A timestep never calibrated uses the nearest calibrated one.

Each row also has a bit-width (`row_bits`, all equal to `bits` unless set otherwise): PTQD's step-aware
mixed precision (quantizers/mixed_precision.py) is a table whose rows differ in bits, so the schedule
travels with the tables into checkpoints and exports and the sampler needs nothing extra.

The timesteps come from the model's own `timestep` argument (quantizers/routing.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .routing import TimestepRouted, nearest_rows, per_sample
from .uniform import at_least_fp32, check_bits, fake_quant, qrange, search_range

# What calibration keeps of a quantizer's activations: a uniform sample of each timestep's values (the range
# search needs no more; the extremes are tracked exactly), at most MAX_OBSERVED_VALUES per timestep and
# OBSERVED_VALUES_PER_QUANTIZER over all of a quantizer's timesteps, on the activations' own device.
MAX_OBSERVED_VALUES = 16384
OBSERVED_VALUES_PER_QUANTIZER = 1 << 18  # 1 MiB of fp32 per quantizer, however many timesteps are selected


class Reservoir:
    """A uniform random sample of at most `cap` values from a stream of tensors, and the stream's exact
    extremes. Merging keeps each part in proportion to how many values it stands for, so the sample stays
    uniform over everything seen; nothing leaves the device (no host syncs)."""

    __slots__ = ("lo", "hi", "seen", "kept")

    def __init__(self, like: torch.Tensor):
        self.lo = torch.full((), float("inf"), device=like.device, dtype=like.dtype)
        self.hi = torch.full((), float("-inf"), device=like.device, dtype=like.dtype)
        self.seen, self.kept = 0, like.new_empty(0)

    def add(self, vals: torch.Tensor, cap: int) -> None:
        self.lo, self.hi = torch.minimum(self.lo, vals.min()), torch.maximum(self.hi, vals.max())
        seen, n = self.seen, vals.numel()
        self.seen = seen + n
        if self.seen <= cap:
            self.kept = torch.cat([self.kept, vals])
            return
        keep_old = round(cap * seen / self.seen)
        self.kept = torch.cat([_subsample(self.kept, keep_old), _subsample(vals, cap - keep_old)])

    def shrink(self, cap: int) -> None:
        if self.kept.numel() > cap:
            self.kept = _subsample(self.kept, cap)


def _subsample(vals: torch.Tensor, m: int) -> torch.Tensor:
    """`m` of `vals` drawn at random: without replacement, or (for a large tensor, where repeats are rare and a
    permutation of all of it would cost more than the draw) with."""
    n = vals.numel()
    if m >= n:
        return vals
    if n > 8 * m:
        return vals[torch.randint(n, (m,), device=vals.device)]
    return vals[torch.randperm(n, device=vals.device)[:m]]


class TemporalQuantizer(TimestepRouted):
    """Per-tensor activation fake quantizer with one (Δ, z) row per calibrated timestep.

    Modes: `observe` records per-timestep statistics and passes inputs through; `init_from_observations`
    turns them into the table; then the quantizer fake-quantizes (`enabled = False` passes through).
    With `per_timestep=False` the table has one row shared by all timesteps (Q-Diffusion, RTN).
    `device`/`dtype` are those of the activations it quantizes; every table lives there.
    """

    def __init__(self, bits: int, symmetric: bool = False, per_timestep: bool = True, device=None, dtype=None):
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = symmetric
        self.per_timestep = per_timestep
        self.delta = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        self.zero = nn.Parameter(torch.zeros(1, device=device, dtype=dtype), requires_grad=not symmetric)
        self.register_buffer("timesteps", torch.zeros(1, device=device, dtype=dtype))
        self.register_buffer("row_bits", torch.full((1,), bits, dtype=torch.int64, device=device))
        self._mixed_bits = False  # any row_bits != bits: the forward then clamps per row
        self.enabled = True
        self.observing = False
        self._t: torch.Tensor | None = None  # timesteps of the current batch, one per sample
        self._stats: dict[float, Reservoir] = {}

    # -- timestep routing (quantizers/routing.py) -------------------------------------------------
    def rows_for(self, t: torch.Tensor) -> torch.Tensor:
        """Table row of each timestep: the nearest calibrated timestep."""
        return nearest_rows(t, self.timesteps)

    def _current_t(self, batch: int) -> torch.Tensor:
        if self._t is None:
            if self.timesteps.numel() == 1 and not self.observing:
                return torch.zeros(batch, device=self.delta.device, dtype=self.timesteps.dtype)
            raise RuntimeError(
                "TemporalQuantizer has no timesteps for this batch: call the model (its `timestep` argument is "
                "routed by quantize_), or set_timesteps(module, t) before running a block alone"
            )
        return per_sample(self._t.to(self.delta.device), batch)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        rows = self.rows_for(self._current_t(x.shape[0]))
        shape = (-1,) + (1,) * (x.dim() - 1)
        if self._mixed_bits:
            qmin, qmax = (b.view(shape) for b in self.row_range(rows))
        else:
            qmin, qmax = qrange(self.bits, self.symmetric)
        return fake_quant(x, self.delta[rows].view(shape), self.zero[rows].view(shape), qmin, qmax)

    def row_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(qmin, qmax) of the given table rows, as float tensors."""
        bits = self.row_bits[rows].to(self.delta.dtype)
        if self.symmetric:
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return torch.zeros_like(bits), 2**bits - 1

    @torch.no_grad()
    def set_row_bits(self, row_bits: torch.Tensor) -> None:
        """One bit-width per table row (step-aware mixed precision); each must be in 2..8."""
        row_bits = torch.as_tensor(row_bits, dtype=torch.int64).reshape(-1)
        if row_bits.numel() != self.timesteps.numel():
            raise ValueError(f"row_bits has {row_bits.numel()} entries for a table of {self.timesteps.numel()} rows")
        for b in row_bits.tolist():
            check_bits(b, "row bits")
        self.row_bits.copy_(row_bits.to(self.row_bits.device))
        self._mixed_bits = bool((self.row_bits != self.bits).any())

    # -- calibration ------------------------------------------------------------------------------
    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        t = self._current_t(x.shape[0])
        keys = t if self.per_timestep else torch.zeros_like(t)
        flat = at_least_fp32(x.detach()).reshape(x.shape[0], -1)
        for key in keys.unique().tolist():
            vals = flat[keys == key].reshape(-1)
            new = key not in self._stats
            if new:
                self._stats[key] = Reservoir(vals)
            cap = min(MAX_OBSERVED_VALUES, OBSERVED_VALUES_PER_QUANTIZER // len(self._stats))
            if new:  # one more timestep shares the quantizer's budget
                for r in self._stats.values():
                    r.shrink(cap)
            self._stats[key].add(vals, cap)

    @torch.no_grad()
    def init_from_observations(self, method: str = "mse") -> None:
        """Build the table from what `observe` saw: one row per observed timestep (or one in all)."""
        if not self._stats:
            raise RuntimeError("TemporalQuantizer saw no data during calibration (is the layer reachable?)")
        keys = sorted(self._stats)
        stats = [self._stats[key] for key in keys]
        n = min(r.kept.numel() for r in stats)  # one search over all rows at once: equal-length subsamples
        values = torch.stack([_subsample(r.kept, n) for r in stats])
        lo, hi = torch.stack([r.lo for r in stats]), torch.stack([r.hi for r in stats])
        delta, zero = search_range(values, self.bits, self.symmetric, method, lo=lo, hi=hi)
        self._resize(len(keys))
        self.delta.copy_(delta)  # copy_ casts into the table's own dtype
        self.zero.copy_(zero)
        self.timesteps.copy_(torch.tensor(keys, dtype=torch.float64))
        self.row_bits.fill_(self.bits)
        self._mixed_bits = False
        self._stats = {}

    def _resize(self, rows: int) -> None:
        if self.delta.numel() == rows:
            return
        like = {"device": self.delta.device, "dtype": self.delta.dtype}
        self.delta = nn.Parameter(torch.ones(rows, **like))
        self.zero = nn.Parameter(torch.zeros(rows, **like), requires_grad=not self.symmetric)
        self.timesteps = torch.zeros(rows, device=self.timesteps.device, dtype=self.timesteps.dtype)
        self.row_bits = torch.full((rows,), self.bits, dtype=torch.int64, device=self.row_bits.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Tables are sized by calibration; a fresh module takes the size of the state it loads.
        saved = state_dict.get(prefix + "timesteps")
        if saved is not None:
            self._resize(saved.numel())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "row_bits" not in state_dict:  # saved before per-row bit-widths existed: all rows at `bits`
            if prefix + "row_bits" in missing_keys:
                missing_keys.remove(prefix + "row_bits")
            self.row_bits.fill_(self.bits)
        self._mixed_bits = bool((self.row_bits != self.bits).any())

    def extra_repr(self) -> str:
        rows = self.timesteps.numel()
        mixed = f", row bits={sorted(set(self.row_bits.tolist()))}" if self._mixed_bits else ""
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, rows={rows}{mixed}"

