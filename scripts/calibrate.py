"""Record calibration trajectories: the FP sampler's UNet inputs (x_t, t, conditioning) and noise
predictions, as sharded `datasets` with a manifest.

    python scripts/calibrate.py --config configs/calibrate.yaml [key=value ...]
    torchrun --nproc_per_node=2 scripts/calibrate.py --config configs/calibrate.yaml

Under torchrun each rank records its own batches of seeds (gloo process group, CPU or GPU); the same
seeds give the same samples whatever the number of ranks. Run again to resume an interrupted recording.
"""
import argparse
import os
import sys
import time

import torch.distributed as dist

import datasets

from qdistill.configs import ConfigError, load_config
from qdistill.configs.schema import TrajectoryConfig
from qdistill.data.calibration import record_calibration_set
from qdistill.data.calibration_set import CalibrationSetError
from qdistill.data.model_folder import ModelFolderError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()  # one bar (ours, rank 0) is enough
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        dist.init_process_group("gloo")  # torchrun also sets OMP_NUM_THREADS=1 per rank
    barrier = dist.barrier if world_size > 1 else (lambda: None)
    try:
        cfg = load_config(TrajectoryConfig, args.config, args.overrides)
        t0 = time.time()
        manifest = record_calibration_set(cfg, rank, world_size, barrier)
    except (ConfigError, ModelFolderError, CalibrationSetError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if manifest is not None:
        seconds = time.time() - t0
        print(f"[calibrate] {cfg.num_samples} trajectories x {cfg.num_steps} {cfg.scheduler} steps on {world_size} "
              f"rank(s): {manifest['num_rows']} rows in {len(manifest['shards'])} shards, {seconds:.1f}s "
              f"({cfg.num_samples / seconds:.2f} samples/s) -> {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
