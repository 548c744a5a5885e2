"""scripts/plan.py's memory figures against a measured `qdistill train` run, on a model built from random weights.

    python -m qdistill.bench.plan_check [--shape ddpm-cifar10] [--out runs/plan-check] [--iterations 5]

Builds the model folder (a DDPMPipeline of the shape, seed 0) and records its trajectories (8 seeds x 8 of 16
DDIM steps: 64 rows) in their own processes, then trains every block for `--iterations` iterations in a fresh
process that reads its resident memory after its imports and at its peak. The measured figure is the peak
less that baseline: what the run itself added, allocator overheads and transients included. The plan is worked
out for the same settings on the meta device. Writes OUT/plan_check.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(train_args: list[str]) -> dict:
    """Run in a fresh process: the peak resident memory of one `qdistill train` above its imports (the baseline
    is read after the train stage and everything it imports are loaded)."""
    import importlib

    for name in ("deepspeed", "torch.utils.tensorboard"):  # imported by the trainer later: in the baseline too
        importlib.import_module(name)

    from qdistill.configs import load_config
    from qdistill.configs.schema import TrainConfig
    from qdistill.stages.train import train

    cfg = load_config(TrainConfig, "dilatequant", train_args)
    baseline = rss_mb()
    metrics = train(cfg)
    return {"baseline_rss_mb": baseline, "peak_rss_mb": metrics["peak_rss_mb_per_rank"],
            "train_seconds": metrics["train_seconds"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="ddpm-cifar10")
    parser.add_argument("--out", default="runs/plan-check")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure)))
        return 0

    from qdistill.bench.unet_shapes import save_random_model
    from qdistill.configs import load_config
    from qdistill.configs.schema import TrainConfig
    from qdistill.trainer.memory_plan import plan

    out = Path(args.out)
    model = out / "model"
    save_random_model(args.shape, model)
    traj = out / "traj"
    if not (traj / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "qdistill", "calibrate", "--config", "calibrate", f"model={model}",
                        f"out={traj}", "num_samples=8", "steps=16", "every=2", "batch_size=8", "overwrite=true"],
                       check=True)
    rows = json.loads((traj / "manifest.json").read_text())["num_rows"]
    overrides = [f"model={model}", f"trajectories={traj}", f"out={out / 'run'}", "overwrite=true",
                 f"distill.iterations={args.iterations}", f"distill.batch_size={args.batch_size}",
                 f"distill.init_rows={rows}", "distill.checkpoint_every=100000", "sampling.num_samples=2",
                 "sampling.steps=2", "threads=2", "deepspeed=zero2.json"]
    proc = subprocess.run([sys.executable, "-m", "qdistill.bench.plan_check", "--measure", *overrides],
                          check=True, capture_output=True, text=True)
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    p = plan(load_config(TrainConfig, "dilatequant", overrides), args.shape, rows, 1, 2)
    planned_mb = p.peak_bytes / 2**20
    added_mb = measured["peak_rss_mb"] - measured["baseline_rss_mb"]
    result = {"shape": args.shape, "rows": rows, "batch_size": args.batch_size, "iterations": args.iterations,
              **measured, "measured_added_mb": round(added_mb, 1), "planned_peak_mb": round(planned_mb, 1),
              "planned_rows": dict(p.rows()), "ratio": round(planned_mb / added_mb, 3)}
    (out / "plan_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
