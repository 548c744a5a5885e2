"""Benchmark the Temporal Parallel Quantizer's mixed-timestep batches against training one timestep at a time.

    python -m qdistill.bench.tpq [--block mid_block.resnets.0] [--updates 200] [--out runs/bench-tpq.json]

One block of the bench teacher (W4A4 DilateQuant student, inputs from the quantized chain, captured for all
calibration rows of runs/trajectories). Both variants start from the same initialised block and give every
timestep's quantizer row the same number of updates:
- parallel: `updates` iterations of batches drawn from all rows (every batch mixes timesteps, each sample
  uses its own timestep's row);
- sequential: for each timestep in sampling order, `updates` iterations of batches of that timestep only
  (so the shared weights see T x `updates` iterations);
- parallel with the sequential run's iteration count (the same compute).
Reports wall time and the block loss per timestep on all rows afterwards.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from qdistill.configs import load_config
from qdistill.configs.schema import TrainConfig
from qdistill.data.calibration_set import load_shard_list, read_manifest
from qdistill.data.model_folder import load_denoiser
from qdistill.quantizers import set_timesteps
from qdistill.trainer.distill import BlockDistiller
from qdistill.trainer.phases import parameter_groups, per_sample_mse
from qdistill.trainer.student import build_student

from qdistill.configs import CONFIG_DIR


def block_loss(block, batch) -> torch.Tensor:
    """Per-sample distillation loss of the block on a batch of captured rows."""
    set_timesteps(block, batch["t"])
    return per_sample_mse(block(*batch["args"], **batch["kwargs"]), batch["target"])


@torch.no_grad()
def loss_per_timestep(block, inputs, t_rows: torch.Tensor) -> dict[int, float]:
    losses = torch.cat([block_loss(block, inputs.batch(idx)) for idx in torch.arange(len(t_rows)).split(64)])
    return {int(t): losses[t_rows == t].mean().item() for t in t_rows.unique().tolist()}


def train(block, inputs, batches, cfg) -> float:
    optimizer = torch.optim.Adam(parameter_groups(block, cfg.lr_weights, cfg.lr_quant))
    t0 = time.time()
    for rows in batches:
        loss = block_loss(block, inputs.batch(rows)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.time() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG_DIR / "dilatequant.yaml"))
    parser.add_argument("--trajectories", default="runs/trajectories")
    parser.add_argument("--block", default="mid_block.resnets.0")
    parser.add_argument("--updates", type=int, default=200, help="updates per timestep row")
    parser.add_argument("--out", default="runs/bench-tpq.json")
    args = parser.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, [f"trajectories={args.trajectories}"])
    torch.set_num_threads(2)
    fp = load_denoiser(cfg.model).eval()
    shards = load_shard_list(cfg.trajectories)
    student, blocks_fp, blocks_q = build_student(fp, cfg, shards, torch.device("cpu"))
    names = [b.name for b in blocks_q]
    if args.block not in names:
        sys.exit(f"--block {args.block} is not a block of {cfg.model}; blocks: {names}")
    k = names.index(args.block)
    distiller = BlockDistiller(fp, student, blocks_fp, blocks_q, shards, cfg.distill, {}, "runs/unused")
    for p in student.parameters():
        p.requires_grad_(False)
    inputs = distiller.block_inputs = distiller._block_inputs()
    inputs.last = k + 1
    for j in range(k):  # the blocks before k carry their outputs (or, without a graph, k's inputs are recomputed)
        inputs.skip(j)
    inputs.begin(k)
    if not inputs.cached:
        sys.exit("the block's rows do not fit in distill.cache_mb / cache_disk_mb; raise them")
    t_rows = torch.cat([shard["timestep"][:] for shard in shards]).float()  # the cache holds rows in shard order
    timesteps = sorted(t_rows.unique().tolist(), reverse=True)  # sampling order
    start = blocks_q[k].module
    g = torch.Generator().manual_seed(0)
    b = cfg.distill.batch_size

    def trainable(block):
        for p in block.parameters():
            p.requires_grad_(True)
        return block

    results = {"block": args.block, "timesteps": len(timesteps), "rows": len(t_rows), "batch_size": b,
               "updates_per_timestep": args.updates, "manifest": read_manifest(cfg.trajectories)["selection"],
               "initial_loss_per_t": loss_per_timestep(start, inputs, t_rows)}
    parallel = trainable(copy.deepcopy(start))
    batches = [torch.randint(len(t_rows), (b,), generator=g) for _ in range(args.updates)]
    results["parallel"] = {"iterations": len(batches), "seconds": round(train(parallel, inputs, batches, cfg.distill), 2)}
    results["parallel"]["loss_per_t"] = loss_per_timestep(parallel, inputs, t_rows)

    sequential = trainable(copy.deepcopy(start))
    batches = []
    for t in timesteps:
        rows_t = torch.nonzero(t_rows == t).flatten()
        batches += [rows_t[torch.randint(len(rows_t), (b,), generator=g)] for _ in range(args.updates)]
    results["sequential"] = {"iterations": len(batches),
                             "seconds": round(train(sequential, inputs, batches, cfg.distill), 2)}
    results["sequential"]["loss_per_t"] = loss_per_timestep(sequential, inputs, t_rows)
    # and parallel again with as many iterations as the sequential run: the same compute
    long = trainable(copy.deepcopy(start))
    batches = [torch.randint(len(t_rows), (b,), generator=g) for _ in range(args.updates * len(timesteps))]
    results["parallel_same_compute"] = {"iterations": len(batches),
                                        "seconds": round(train(long, inputs, batches, cfg.distill), 2)}
    results["parallel_same_compute"]["loss_per_t"] = loss_per_timestep(long, inputs, t_rows)
    for key in ("parallel", "sequential", "parallel_same_compute"):
        results[key]["mean_loss"] = sum(results[key]["loss_per_t"].values()) / len(timesteps)
    results["initial_mean_loss"] = sum(results["initial_loss_per_t"].values()) / len(timesteps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"block {args.block}: {len(timesteps)} timesteps, {args.updates} updates per timestep row, batch {b}")
    print(f"  {'initial':22s}{0:6d} iterations {0:8.2f}s  loss {results['initial_mean_loss']:.4e}")
    for key in ("parallel", "sequential", "parallel_same_compute"):
        r = results[key]
        print(f"  {key:22s}{r['iterations']:6d} iterations {r['seconds']:8.2f}s  loss {r['mean_loss']:.4e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
