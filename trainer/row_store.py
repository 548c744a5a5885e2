"""Per-row values of all of a rank's calibration rows for one block (its captured inputs, its outputs), stored
within a budget: in memory on the training device, else in memory-mapped files on local disk, else not at all
(the caller recomputes).

A value is a pytree of one model batch of rows (tensors, tuples, dicts, diffusers output classes). Tensors whose
batch dimension is the model batch (rows × `fold`, the fold being 2 for guidance batches, whose halves are
[uncond, cond]) are stored as [fold, rows, ...], so any selection of rows can be reassembled; everything else is
kept from the first chunk.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

MEMORY, DISK = "memory", "disk"
DISK_MARGIN = 1 << 30  # never fill a disk to its last GiB


class StorageBudget:
    """What this rank may keep: `memory_mb` on the training device, `disk_mb` in `disk_dir` (None: the system's
    temporary directory)."""

    _names = itertools.count()

    def __init__(self, memory_mb: float, disk_mb: float = 0, disk_dir: str | Path | None = None):
        self.left = {MEMORY: int(memory_mb * 2**20), DISK: int(disk_mb * 2**20)}
        self.disk_dir = Path(disk_dir) if disk_dir else Path(tempfile.gettempdir())
        self.in_use = self.peak = 0  # bytes held (memory and disk), now and at most

    def take(self, nbytes: int) -> str | None:
        """Where `nbytes` more fit (memory first), reserved; None when nowhere."""
        where = None
        if nbytes <= self.left[MEMORY]:
            where = MEMORY
        elif nbytes <= self.left[DISK]:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.disk_dir).free >= nbytes + DISK_MARGIN:
                where = DISK
        if where is not None:
            self.left[where] -= nbytes
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        return where

    def give_back(self, where: str, nbytes: int) -> None:
        self.left[where] += nbytes
        self.in_use -= nbytes

    def disk_tensor(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled CPU tensor backed by a new file in disk_dir. The file is unlinked at once: the mapping
        keeps its pages until the tensor is freed, and nothing is left behind by a crash."""
        path = self.disk_dir / f".qdistill-rows-{os.getpid()}-{next(self._names)}.bin"
        numel = 1
        for s in shape:
            numel *= s
        t = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        path.unlink()
        return t.view(shape)


class RowStore:
    """One per-row value for `total_rows` rows, filled chunk by chunk (`put`), read by any rows (`select`)."""

    def __init__(self, spec, leaves: list, batched: list[bool], fold: int, where: str, nbytes: int,
                 budget: StorageBudget, device: torch.device):
        self.spec, self.leaves, self.batched, self.fold = spec, leaves, batched, fold
        self.where, self.nbytes, self.budget, self.device = where, nbytes, budget, device

    @classmethod
    def create(cls, first, rows: int, total_rows: int, fold: int, budget: StorageBudget) -> RowStore | None:
        """A store shaped like `first` (the value of a chunk of `rows` rows), or None when it fits nowhere."""
        leaves, spec = tree_flatten(first)
        batched = [isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows * fold for x in leaves]
        nbytes = sum(x[0].numel() * x.element_size() * fold * total_rows for x, b in zip(leaves, batched) if b)
        where = budget.take(nbytes)
        if where is None:
            return None
        device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), torch.device("cpu"))
        stored = []
        for x, b in zip(leaves, batched):
            if not b:
                stored.append(x)
                continue
            shape = (fold, total_rows, *x.shape[1:])
            stored.append(torch.empty(shape, dtype=x.dtype, device=device) if where == MEMORY
                          else budget.disk_tensor(shape, x.dtype))
        return cls(spec, stored, batched, fold, where, nbytes, budget, device)

    def put(self, value, start: int) -> None:
        """Store the value of the chunk of rows start, start + 1, ..."""
        for store, x, b in zip(self.leaves, tree_flatten(value)[0], self.batched):
            if b:
                rows = x.shape[0] // self.fold
                store[:, start:start + rows].copy_(x.unflatten(0, (self.fold, rows)))

    def select(self, rows: torch.Tensor):
        """The value of a model batch of `rows` (indices into the store), on the training device."""
        rows = rows.to(self.leaves[self.batched.index(True)].device) if any(self.batched) else rows
        return tree_unflatten([x[:, rows].flatten(0, 1).to(self.device) if b else x
                               for x, b in zip(self.leaves, self.batched)], self.spec)

    def release(self) -> None:
        if self.leaves:
            self.budget.give_back(self.where, self.nbytes)
            self.leaves = []
