"""Full quantization-aware training of the whole model vs block-wise distillation (BKD): time and memory.

    python -m qdistill.bench.qat [--iterations-per-block 20] [--out runs/bench-qat]

Three runs on the bench teacher at W4A4, each in its own process (so each peak RSS is its own), from the
same initialised student (Weight Dilation + TPQ), batch size and learning rates (the dilatequant config):
- BKD, qdistill train on 1 rank: N iterations per block, block inputs cached;
- BKD with distill.cache_mb=0: block inputs recomputed for every batch (the low-memory mode);
- full QAT (`--mode qat`): the whole quantized model trained end to end to reproduce the FP noise prediction
  on the same calibration rows, for N x (number of blocks) iterations: the same number of updates.
Each reports training wall time, peak RSS, and PSNR / noise-prediction MSE against FP on 8 seeds
(DDIM 20 steps). Writes OUT/results.json and prints a Markdown table.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from qdistill.configs import CONFIG_DIR
SAMPLING = ["sampling.num_samples=8", "sampling.steps=20"]


def qat(args) -> dict:
    import datasets
    import torch
    from diffusers.models.attention_processor import Attention

    from qdistill.configs import load_config
    from qdistill.configs.schema import TrainConfig
    from qdistill.data.calibration_set import load_shard_list, to_model_inputs
    from qdistill.data.model_folder import load_denoiser, load_scheduler
    from qdistill.evaluation.sampling import compare_to_fp
    from qdistill.trainer.phases import parameter_groups
    from qdistill.trainer.student import build_student

    torch.set_num_threads(2)
    cfg = load_config(TrainConfig, args.config, [f"trajectories={args.trajectories}", *SAMPLING])
    fp = load_denoiser(cfg.model).eval()
    shards = load_shard_list(cfg.trajectories)
    student, _, blocks = build_student(fp, cfg, shards, torch.device("cpu"))
    # diffusers' attention returns channels_last views, and GroupNorm's CPU backward crashes on those
    # (torch 2.13): hand the next layer a contiguous tensor
    for m in student.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, a, out: out.contiguous() if isinstance(out, torch.Tensor) else out)
    for p in student.parameters():
        p.requires_grad_(True)
    iterations = args.iterations_per_block * len(blocks)
    d = cfg.distill
    optimizer = torch.optim.Adam(parameter_groups(student, d.lr_weights, d.lr_quant))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / iterations)))
    rows = datasets.concatenate_datasets(shards).with_format("torch")
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for it in range(iterations):
        batch = rows[torch.randint(len(rows), (d.batch_size,), generator=g).tolist()]
        loss = (student(**to_model_inputs(batch)).sample - batch["noise_pred"]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if it % 50 == 0:
            print(f"[qat] iteration {it}/{iterations} loss {loss.item():.4e}", flush=True)
    seconds = time.time() - t0
    student.eval()
    s = cfg.sampling
    _, _, fidelity = compare_to_fp(fp, student, load_scheduler(cfg.model, s.scheduler),
                                   range(s.seed, s.seed + s.num_samples), s.steps, s.batch_size, s.eta)
    return {"iterations": iterations, "train_seconds": round(seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "psnr_db": round(fidelity["psnr_db"], 2), "noise_pred_mse": fidelity["noise_pred_mse_mean"]}


def bkd(args, name: str, *overrides: str) -> dict:
    out = Path(args.out) / name
    cmd = [sys.executable, "-m", "qdistill", "train", "--config", args.config,
           f"trajectories={args.trajectories}", f"out={out}", "overwrite=true", "deepspeed=zero0.json", "threads=2",
           f"distill.iterations={args.iterations_per_block}", "distill.checkpoint_every=0", *SAMPLING, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"iterations": sum(b["iterations"] for b in m["blocks"]), "train_seconds": m["train_seconds"],
            "peak_rss_mb": m["peak_rss_mb_per_rank"], "psnr_db": round(m["psnr_db"], 2),
            "noise_pred_mse": m["noise_pred_mse_mean"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG_DIR / "dilatequant.yaml"))
    parser.add_argument("--trajectories", default="runs/trajectories")
    parser.add_argument("--iterations-per-block", type=int, default=20)
    parser.add_argument("--out", default="runs/bench-qat")
    parser.add_argument("--mode", choices=["all", "qat"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "qat":
        print("RESULT " + json.dumps(qat(args)), flush=True)
        return 0
    results = {}
    print("[bench] BKD, inputs cached ...", flush=True)
    results["BKD (inputs cached)"] = bkd(args, "bkd-cached")
    print("[bench] BKD, inputs recomputed per batch ...", flush=True)
    results["BKD (inputs recomputed, cache_mb=0)"] = bkd(args, "bkd-recompute", "distill.cache_mb=0")
    print("[bench] full QAT ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", __name__, "--mode", "qat", "--config", args.config,
                           "--trajectories", args.trajectories, "--iterations-per-block", str(args.iterations_per_block)],
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"full QAT failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results["full QAT"] = json.loads(lines[-1][len("RESULT "):])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    qat_r = results["full QAT"]
    print("\n| run | updates | training time (s) | peak RSS (MB) | PSNR vs FP (dB) | noise-pred. MSE |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        rel = f" ({100 * r['train_seconds'] / qat_r['train_seconds']:.0f} % of QAT)" if name != "full QAT" else ""
        print(f"| {name} | {r['iterations']} | {r['train_seconds']}{rel} | {r['peak_rss_mb']} | {r['psnr_db']} | "
              f"{r['noise_pred_mse']:.3e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
