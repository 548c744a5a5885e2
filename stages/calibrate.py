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
from ..distributed_env import check_shared_folders, process_group

logger = logging.getLogger(__name__)


def calibrate(cfg: TrajectoryConfig) -> dict | None:
    """Record `cfg.out`; returns the manifest on rank 0 (None on the other ranks)."""
    datasets.disable_progress_bars()  # one progress report (ours, rank 0) is enough
    with process_group("gloo") as (rank, world_size, _):  # barriers only (the rows go to disk): gloo, even on GPUs
        barrier = dist.barrier if world_size > 1 else (lambda: None)
        check_shared_folders({}, rank, world_size, write={"out": Path(cfg.out)})  # every rank writes shards there
        t0 = time.time()
        manifest = record_calibration_set(cfg, rank, world_size, barrier)
    if manifest is not None:
        seconds = time.time() - t0
        logger.info(f"{cfg.num_samples} trajectories x {cfg.steps} {cfg.scheduler} steps on {world_size} "
                    f"rank(s): {manifest['num_rows']} rows in {len(manifest['shards'])} shards, {seconds:.1f}s "
                    f"({cfg.num_samples / seconds:.2f} samples/s) -> {cfg.out}")
    return manifest
