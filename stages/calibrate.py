"""calibrate: record the FP sampler's trajectories (model inputs x_t, t, conditioning and noise predictions) as
sharded `datasets` with a manifest (data/calibration.py). Under torchrun each rank records its own batches (a
gloo group; under srun, one per task); the same seeds give the same rows whatever the number of ranks. Run again
to resume."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import datasets
import torch.distributed as dist

from ..configs.schema import TrajectoryConfig
from ..data.calibration import record_calibration_set
from ..distributed_env import check_shared_folders, rank_environment

logger = logging.getLogger(__name__)


def calibrate(cfg: TrajectoryConfig) -> dict | None:
    """Record `cfg.out`; returns the manifest on rank 0 (None on the other ranks)."""
    datasets.disable_progress_bars()  # one progress report (ours, rank 0) is enough
    with rank_environment() as (rank, world_size):
        owns_group = world_size > 1 and not dist.is_initialized()
        if owns_group:  # barriers only (the rows go to disk), so gloo, even on GPUs
            dist.init_process_group("gloo")  # torchrun also sets OMP_NUM_THREADS=1 per rank
        barrier = dist.barrier if world_size > 1 else (lambda: None)
        try:
            check_shared_folders({}, rank, world_size, write={"out": Path(cfg.out)})  # every rank writes shards there
            t0 = time.time()
            manifest = record_calibration_set(cfg, rank, world_size, barrier)
        finally:
            if owns_group:
                dist.destroy_process_group()
    if manifest is not None:
        seconds = time.time() - t0
        logger.info(f"{cfg.num_samples} trajectories x {cfg.num_steps} {cfg.scheduler} steps on {world_size} "
                    f"rank(s): {manifest['num_rows']} rows in {len(manifest['shards'])} shards, {seconds:.1f}s "
                    f"({cfg.num_samples / seconds:.2f} samples/s) -> {cfg.out}")
    return manifest
