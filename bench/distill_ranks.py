"""Benchmark block-wise distillation across launchers: 1 rank vs 2 ranks, ZeRO 0 vs ZeRO 2.

    python -m qdistill.bench.distill_ranks [--iterations 100] [--out runs/bench-ranks]

Runs qdistill train on the bench teacher (W4A4, the dilatequant config, the trajectories in
runs/trajectories) three ways: plain python (1 rank, 2 threads), torchrun 2 ranks x 1 thread with ZeRO 0,
and with ZeRO 2. Reports training samples/s (inside the block loops, and overall including the capture of
block inputs), time per block, and peak RSS per rank; writes OUT/results.json and prints a Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qdistill.configs import CONFIG_DIR

VARIANTS = [  # name, ranks, DeepSpeed config, torch threads per rank
    ("1 rank, ZeRO 0", 1, "zero0.json", 2),
    ("2 ranks, ZeRO 0", 2, "zero0.json", 1),
    ("2 ranks, ZeRO 2", 2, "zero2.json", 1),
]


def run(name: str, ranks: int, zero: str, threads: int, args) -> dict:
    out = Path(args.out) / name.replace(", ", "-").replace(" ", "")
    train = ["-m", "qdistill", "train", "--config", args.config, f"trajectories={args.trajectories}",
             f"out={out}", "overwrite=true", f"deepspeed={zero}", f"threads={threads}",
             f"distill.iterations={args.iterations}", "distill.checkpoint_every=0",
             "sampling.num_samples=4", "sampling.steps=10"]
    cmd = [sys.executable, *train] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    blocks = m["blocks"]
    loop_seconds = sum(b["seconds"] for b in blocks)
    samples = sum(b["iterations"] for b in blocks) * m["batch_size"]
    return {"variant": name, "ranks": ranks, "zero": zero, "threads_per_rank": threads,
            "iterations_per_block": args.iterations, "blocks": len(blocks),
            "train_seconds": m["train_seconds"], "wall_seconds": round(time.time() - t0, 1),
            "loop_samples_per_s": round(samples / loop_seconds, 1),
            "overall_samples_per_s": round(samples / m["train_seconds"], 1),
            "mean_block_seconds": round(m["train_seconds"] / len(blocks), 2),
            "max_block_seconds": round(max(b["seconds"] + b["cache_seconds"] for b in blocks), 2),
            "peak_rss_mb_per_rank": m["peak_rss_mb_per_rank"], "psnr_db_4_seeds": round(m["psnr_db"], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG_DIR / "dilatequant.yaml"))
    parser.add_argument("--trajectories", default="runs/trajectories")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--out", default="runs/bench-ranks")
    args = parser.parse_args(argv)
    results = []
    for variant in VARIANTS:
        print(f"[bench] {variant[0]} ...", flush=True)
        results.append(run(*variant, args))
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| variant | samples/s in block loops | samples/s overall | s per block (mean) | peak RSS per rank (MB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['loop_samples_per_s']} | {r['overall_samples_per_s']} | "
              f"{r['mean_block_seconds']} | {r['peak_rss_mb_per_rank']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
