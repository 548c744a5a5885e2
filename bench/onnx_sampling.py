"""Sampling through ONNX Runtime: an export's QDQ graphs (K timestep groups) driven by the diffusers scheduler,
against simulated mode (its per-timestep tables) and the FP model on the same seeds.

    python -m qdistill.bench.onnx_sampling --export runs/benchmark-w8a8/rows/dilatequant-W8A8-ddim-keep/export \\
        --groups 1 2 4 --samples 64

For each K: the ONNX export's seconds and bytes, then DDIM samples of ORT, and their PSNR against simulated
mode's samples and against the FP model's. The PSNR of simulated mode against FP is the reference: what the
static groups lose is the difference.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from qdistill.data.model_folder import convert_scheduler, load_denoiser, scheduler_from_file
from qdistill.evaluation.fidelity import psnr
from qdistill.evaluation.sampling import sample_batch
from qdistill.export import OnnxDenoiser, export_onnx, load_exported, read_export_meta
from qdistill.files import atomic_write_text


def samples(model, scheduler, seeds, steps, batch):
    return torch.cat([sample_batch(model, scheduler, seeds[i:i + batch], steps) for i in range(0, len(seeds), batch)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="a qdistill export folder (qdistill export)")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON of the results (default: none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    export = Path(args.export)
    meta = read_export_meta(export)
    scheduler = convert_scheduler(scheduler_from_file(export / "scheduler_config.json"), "ddim")
    seeds = list(range(10_000, 10_000 + args.samples))
    fp = load_denoiser(meta["source_model"]).eval()
    sim = load_exported(export, "simulated")
    x_fp = samples(fp, scheduler, seeds, args.steps, args.batch)
    x_sim = samples(sim, scheduler, seeds, args.steps, args.batch)
    result = {"export": str(export), "samples": args.samples, "steps": args.steps, "threads": args.threads,
              "simulated_vs_fp_psnr_db": psnr(x_sim, x_fp).mean().item(), "groups": {}}
    print(f"[onnx] {args.samples} seeds, DDIM {args.steps}: simulated vs FP {result['simulated_vs_fp_psnr_db']:.2f} dB")
    tmp = Path(tempfile.mkdtemp(prefix="qdistill-onnx-"))
    for k in args.groups:
        t0 = time.perf_counter()
        manifest = export_onnx(export, k, out=tmp / f"k{k}")
        seconds = time.perf_counter() - t0
        denoiser = OnnxDenoiser(tmp / f"k{k}", threads=args.threads)
        t0 = time.perf_counter()
        x_ort = samples(denoiser, scheduler, seeds, args.steps, args.batch)
        row = {"graphs": len(manifest["groups"]), "export_seconds": round(seconds, 1),
               "bytes": sum(f["bytes"] for f in manifest["files"].values()),
               "sampling_seconds": round(time.perf_counter() - t0, 1),
               "vs_simulated_psnr_db": psnr(x_ort, x_sim).mean().item(),
               "vs_fp_psnr_db": psnr(x_ort, x_fp).mean().item()}
        result["groups"][k] = row
        print(f"[onnx] K={k}: {row['graphs']} graph(s), export {seconds:.0f} s, {row['bytes'] / 1024:.0f} KiB; "
              f"ORT vs simulated {row['vs_simulated_psnr_db']:.2f} dB, vs FP {row['vs_fp_psnr_db']:.2f} dB; "
              f"sampling {row['sampling_seconds']:.1f} s")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
