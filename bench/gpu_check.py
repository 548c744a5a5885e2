"""The GPU check (scripts/gpu_check.sh runs it): every stage on one GPU, then distillation at SD-1.5 width.

1. calibrate → train (1 rank, NCCL, bf16) → export → eval on the bench teacher, each stage in this process, then
   the export in integer mode on the device (CUDA: torch._int_mm for linear layers) against simulated mode;
2. a random-weight SD-1.5-shaped UNet2DConditionModel (860M parameters, 64×64 latents, 77×768 text states)
   saved as a model folder, with random trajectories written as real calibration shards, trained for a few
   iterations on its first blocks (`--sd-blocks`).

Prints one line per stage: PASS/FAIL, seconds, peak GPU memory, throughput; writes OUT/gpu_check.json. A
failing stage prints its traceback and the check goes on. `--quick` shrinks everything to CPU size, so the
script itself can be tried on a machine without a GPU.

    python -m qdistill.bench.gpu_check --out runs/gpu_check
    python -m qdistill.bench.gpu_check --device cpu --quick        # a dry run of the script on the CPU
"""
import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from qdistill.model_shapes import SD15
from qdistill.configs import load_config
from qdistill.configs.schema import EvalConfig, ExportConfig, TrainConfig, TrajectoryConfig

SD15_QUICK = dict(SD15, sample_size=16, cross_attention_dim=32, block_out_channels=(32, 32, 64, 64), norm_num_groups=8)


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_stage(name: str, fn, device, results: list) -> dict | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    try:
        info = fn() or {}
        status = "PASS"
    except Exception:  # the check reports every stage, failing or not
        traceback.print_exc()
        info, status = {}, "FAIL"
    seconds = time.time() - t0
    row = {"stage": name, "status": status, "seconds": round(seconds, 1), "peak_gpu_gb": peak_gb(device), **info}
    results.append(row)
    mem = f"{row['peak_gpu_gb']:.2f} GiB" if row["peak_gpu_gb"] is not None else "-"
    extra = ", ".join(f"{k} {v}" for k, v in info.items())
    print(f"[gpu_check] {status} {name}: {seconds:.1f} s, peak GPU memory {mem}{', ' + extra if extra else ''}",
          flush=True)
    return info if status == "PASS" else None


def sd_shaped_run(out: Path, quick: bool, rows: int) -> tuple[Path, Path]:
    """An SD-1.5-shaped model folder and random trajectories for it, as real calibration shards."""
    from diffusers import UNet2DConditionModel

    from qdistill.data.calibration_set import write_manifest, write_shard
    from qdistill.data.model_folder import model_hash

    config = SD15_QUICK if quick else SD15
    model_dir, traj = out / "sd15-shaped" / "unet", out / "sd15-shaped" / "trajectories"
    torch.manual_seed(0)
    UNet2DConditionModel(**config).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(1)
    c, s, d = config["in_channels"], config["sample_size"], config["cross_attention_dim"]
    n = rows // 2
    for i in range(2):  # two shards of n rows, timesteps spread over the schedule
        write_shard(traj, i, {"sample_id": list(range(i * n, (i + 1) * n)), "step": list(range(n)),
                              "timestep": [float(t) for t in torch.linspace(999, 0, n).round()],
                              "x_t": list(torch.randn(n, c, s, s, generator=g).numpy()),
                              "noise_pred": list(torch.randn(n, c, s, s, generator=g).numpy()),
                              "encoder_hidden_states": list(torch.randn(n, 77, d, generator=g).numpy())})
    write_manifest(traj, 2, {"source_model": str(model_dir), "source_model_hash": model_hash(model_dir),
                             "model_class": "UNet2DConditionModel", "conditioning": "text", "num_steps": n,
                             "shapes": {"x_t": [c, s, s]}, "dtype": "float32"})
    return model_dir, traj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--quick", action="store_true", help="CPU-sized: a dry run of the script")
    parser.add_argument("--sd-blocks", type=int, default=4, help="SD-1.5-shaped blocks to train")
    args = parser.parse_args(argv)

    import logging

    from qdistill.cli import setup_logging
    from qdistill.devices import resolve_device
    from qdistill.stages import calibrate, evaluate, export, train

    setup_logging()
    logging.getLogger("qdistill").setLevel(logging.WARNING)  # this check's own lines, and warnings
    out = Path(args.out)
    device = resolve_device(args.device)
    dev = ["device=" + args.device, f"precision={args.precision}"]
    n = 16 if args.quick else 64
    iters = 2 if args.quick else 50
    if device.type == "cuda":
        print(f"[gpu_check] {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    results: list[dict] = []

    def do_calibrate():
        t0 = time.time()
        calibrate(load_config(TrajectoryConfig, "calibrate", [f"out={out / 'traj'}", f"num_samples={n}",
                                                              "batch_size=16", "overwrite=true", *dev]))
        return {"samples_per_s": round(n / (time.time() - t0), 1)}

    def do_train():
        m = train(load_config(TrainConfig, "dilatequant", [
            f"trajectories={out / 'traj'}", f"out={out / 'train'}", "quant.act_bits=8", f"distill.iterations={iters}",
            "distill.batch_size=32", "distill.init_rows=256", "distill.checkpoint_every=0", "overwrite=true",
            "deepspeed=zero0.json", "sampling.num_samples=8", *dev]))
        loop = [b["samples_per_s"] for b in m["blocks"] if b["samples_per_s"]]
        return {"blocks": len(m["blocks"]), "psnr_db": round(m["psnr_db"], 2),
                "in_loop_samples_per_s": round(sum(loop) / len(loop), 1)}

    def do_export():
        export(load_config(ExportConfig, None, [f"run={out / 'train'}", *dev]))

    def do_eval():
        m = evaluate(load_config(EvalConfig, "eval", [
            f"model={out / 'train' / 'export'}", "mode=simulated", f"num_samples={n}", "batch_size=64",
            f"cache_dir={out / 'cache'}", "fidelity_samples=4", *dev]))
        return {"fd": round(m["fd"], 2), "psnr_db": round(m["psnr_db"], 2),
                "samples_per_s": round(n / m["sampling_seconds"], 1)}

    def do_integer():  # integer mode on this device: torch._int_mm linears on CUDA (convs simulated), oneDNN on CPU
        from qdistill.export import load_exported
        from qdistill.quantizers.routing import set_timesteps

        folder = out / "train" / "export"
        sim = load_exported(folder, "simulated", device=device)
        integer = load_exported(folder, "integer", device=device)
        report = integer.qdistill_export["integer_report"]
        x = torch.randn(64, *[sim.config.in_channels] + [sim.config.sample_size] * 2, device=device)
        t = torch.full((64,), 500.0, device=device)
        with torch.no_grad():
            ref, y = sim(x, t).sample, integer(x, t).sample
            timings = {}
            for name, m in (("simulated", sim), ("integer", integer)):
                for _ in range(3):
                    m(x, t)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(20):
                    m(x, t)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timings[name] = round((time.perf_counter() - t0) / 20 * 1000, 2)
        set_timesteps(integer, None)
        err = ((y - ref).norm() / ref.norm()).item()
        if err > 2e-2:
            raise AssertionError(f"integer vs simulated relative error {err:.4f} > 0.02")
        return {"linear_kernel": report["linear_kernel"], "integer_layers": len(report["integer"]),
                "simulated_layers": sum(len(v) for v in report["simulated"].values()), "rel_err": round(err, 5),
                "batch64_ms": timings}

    def do_sd15():  # its own process: DeepSpeed keeps its process groups for the life of a process
        model_dir, traj = sd_shaped_run(out, args.quick, rows=8 if args.quick else 32)
        run = out / "sd15-shaped" / "train"
        cmd = [sys.executable, "-m", "qdistill", "train", "--config", "dilatequant", f"model={model_dir}",
               f"trajectories={traj}", f"out={run}", "quant.act_bits=8", "distill.iterations=5",
               "distill.batch_size=4", "distill.init_rows=8", "distill.checkpoint_every=0", "distill.cache_mb=0",
               "overwrite=true", "deepspeed=zero0.json",
               f"distill.max_blocks={args.sd_blocks}", *dev]
        subprocess.run(cmd, check=True)
        m = json.loads((run / "metrics.json").read_text())
        loop = [b["samples_per_s"] for b in m["blocks"] if b["samples_per_s"]]
        return {"blocks": len(m["blocks"]), "in_loop_samples_per_s": round(sum(loop) / len(loop), 2),
                "train_peak_gpu_mb": m["peak_gpu_mb_per_rank"], "peak_rss_mb": m["peak_rss_mb_per_rank"]}

    for name, fn in (("calibrate", do_calibrate), ("train", do_train), ("export", do_export), ("eval", do_eval),
                     ("integer mode", do_integer), ("sd15-shaped train", do_sd15)):
        run_stage(name, fn, device, results)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    failed = [r["stage"] for r in results if r["status"] != "PASS"]
    print(f"[gpu_check] {len(results) - len(failed)}/{len(results)} stages passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
