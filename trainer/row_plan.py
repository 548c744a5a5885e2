"""Which calibration rows each rank trains on.

Every iteration's global batch takes a fixed number of rows from every shard (`rows_per_shard`: the batch
spread as evenly as it divides), drawn by a pure function of (seed, block, iteration, shard). Laid end to end
in shard order, the global batch is cut into `world_size` equal slices, one per rank. So the global batch, and
with equal slices the gradient DeepSpeed averages, is the same for any rank count that divides it, whatever the
shard count; and each rank reads the same few shards every iteration (those its slice overlaps), so it loads
and caches only those.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


def rows_per_shard(num_shards: int, batch_size: int) -> list[int]:
    """How many rows one iteration takes from each shard (they sum to `batch_size`)."""
    return [(s + 1) * batch_size // num_shards - s * batch_size // num_shards for s in range(num_shards)]


def rank_share(shard_lengths: list[int], batch_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(shard, first, end): the positions of each shard's per-iteration draw that `rank` trains on."""
    num_shards = len(shard_lengths)
    if batch_size % world_size:
        raise ConfigError(f"distill.batch_size ({batch_size}) must be a multiple of the {world_size} ranks (every "
                          "rank trains on an equal slice of each iteration's batch)")
    if batch_size < num_shards:
        raise ConfigError(f"distill.batch_size ({batch_size}) is smaller than the calibration set's {num_shards} "
                          "shards: every iteration takes at least one row from each (raise it, or record fewer, "
                          "larger shards)")
    counts = rows_per_shard(num_shards, batch_size)
    short = [s for s, (n, c) in enumerate(zip(shard_lengths, counts)) if n < c]
    if short:
        raise ConfigError(f"shard {short[0]} has {shard_lengths[short[0]]} rows, fewer than the {counts[short[0]]} an "
                          f"iteration of distill.batch_size={batch_size} takes from it")
    lo, hi = rank * batch_size // world_size, (rank + 1) * batch_size // world_size
    share, start = [], 0
    for s, c in enumerate(counts):
        a, b = max(lo, start), min(hi, start + c)
        if a < b:
            share.append((s, a - start, b - start))
        start += c
    return share


def draw_rows(seed: int, block_index: int, iteration: int, shard_index: int, shard_len: int, count: int
              ) -> torch.Tensor:
    """The rows one iteration draws from one shard: a pure function of its arguments."""
    key = ((seed * 1_000_003 + block_index) * 1_000_003 + iteration) * 1_000_003 + shard_index
    g = torch.Generator().manual_seed(key % (2**63))
    return torch.randperm(shard_len, generator=g)[:count]


def held_out_rows(seed: int, shard_index: int, shard_len: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held, pool) of one shard: `count` rows kept out of training for the run's evaluation batch (the same for
    every block), and the rows training draws from. A shard with fewer than 2·count rows holds none out: its
    evaluation rows are trained on too."""
    held = draw_rows(seed, -1, -1, shard_index, shard_len, count)
    if shard_len < 2 * count:
        return held, torch.arange(shard_len)
    keep = torch.ones(shard_len, dtype=torch.bool)
    keep[held] = False
    return held, keep.nonzero().flatten()
