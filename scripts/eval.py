"""Judge an exported quantized model: sample it on fixed seeds and compare with the data and the FP model.
Reads only export folders (scripts/export.py) and, optionally, the FP model folder.

    python scripts/eval.py --model runs/demo-w4a4/export --reference bench/teacher --out runs/demo-w4a4/eval
    torchrun --standalone --nproc_per_node=2 scripts/eval.py --model EXPORT --reference FP --out EVAL

1. load the export (`--mode integer`: int8 kernels; `simulated`: float kernels, bit-exact with training);
2. sample N seeds with the chosen diffusers scheduler, seed batches split across ranks (an export with PTQD's
   statistics, or `--ptqd`: the quantized model through PTQD's noise-corrected scheduler; `--no-ptqd`: plain;
   FP stays plain);
3. the FP reference on the same seeds (cached by model hash and sampler settings: not resampled next time);
4. metrics: FD in the bench classifier's features (to the test split, for FP too, and quantized vs FP);
   FID/sFID/IS with a local TorchScript Inception (--inception); PSNR and SSIM of final samples vs FP;
   per-step noise-prediction MSE on the FP trajectory; CLIP score for text-conditional models (--clip);
5. EVAL/metrics.json, EVAL/samples.png (FP | quantized), TensorBoard scalars in EVAL/tb.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from qdistill.data.model_folder import (ModelFolderError, convert_scheduler, load_scheduler, load_unet, model_hash,
                                       scheduler_from_file)
from qdistill.evaluation.fidelity import psnr, save_grid
from qdistill.evaluation.reference_cache import default_cache_dir, load_reference, reference_key, save_reference
from qdistill.evaluation.sampling import (from_uint8, init_eval_distributed, noise_pred_mse_per_step, recorded_calls,
                                          sample_across_ranks, sample_batch)
from qdistill.export import ExportError, load_exported, load_noise_correction, read_export_meta
from qdistill.quantizers import NoiseCorrectedScheduler
from qdistill.trainer.checkpoint import atomic_write_text

SCHEDULERS = ("ddim", "ddpm", "dpm")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export folder (scripts/export.py)")
    p.add_argument("--reference", default=None, help="the FP model folder (enables fidelity metrics and ΔFD)")
    p.add_argument("--out", required=True, help="folder for metrics.json, samples.png and tb/")
    p.add_argument("--mode", choices=("integer", "simulated"), default="integer")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--ptqd", action=argparse.BooleanOptionalAction, default=None,
                   help="sample the quantized model with PTQD's noise correction (statistics from scripts/export.py "
                        "noise_correction=true; ddim or ddpm). Default: when the export holds them")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=100_000, help="samples use seeds seed, seed+1, ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--fidelity-samples", type=int, default=16, help="seeds whose FP trajectory gives the per-step MSE")
    p.add_argument("--classifier", default="bench/classifier", help="bench classifier folder (FD features)")
    p.add_argument("--inception", default=None, help="TorchScript feature network file for FID/sFID/IS")
    p.add_argument("--clip", default=None, help="local CLIP model folder (text-conditional models)")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (text-conditional models)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--cache-dir", default=None, help=f"FP reference cache (default {default_cache_dir()})")
    args = p.parse_args(argv)
    for key in ("steps", "num_samples", "batch_size", "fidelity_samples"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = init_eval_distributed()
    log = (lambda msg: print(f"[eval] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    out = Path(args.out)

    # 1. the export, its scheduler, the FP model
    try:
        meta = read_export_meta(args.model)
        if args.ptqd is None:  # the export decides: a ptqd export is sampled the way it was made for
            args.ptqd = "noise_correction" in meta
        correction = load_noise_correction(args.model) if args.ptqd else None
        if args.ptqd and correction is None:
            raise ExportError(f"--ptqd: {args.model} holds no noise-correction statistics (export it with "
                              "scripts/export.py noise_correction=true)")
        qunet = load_exported(args.model, args.mode)
        exported_scheduler = Path(args.model) / "scheduler_config.json"
        if exported_scheduler.is_file():
            base = scheduler_from_file(exported_scheduler)
        elif args.reference is not None:
            base = load_scheduler(args.reference)
        else:
            raise ExportError(f"{args.model} has no scheduler_config.json; pass --reference")
        scheduler = convert_scheduler(base, args.scheduler)
        q_scheduler = scheduler
        if args.ptqd:
            try:
                q_scheduler = NoiseCorrectedScheduler(scheduler, correction)
            except (TypeError, ValueError) as e:  # e.g. --scheduler dpm: PTQD wraps DDIM and DDPM only
                raise ExportError(f"PTQD noise correction (--ptqd; --no-ptqd samples plainly): {e}") from None
        fp = load_unet(args.reference).eval() if args.reference else None
        pipe_kwargs = {}
        if getattr(qunet.config, "cross_attention_dim", None):
            if args.reference is None or args.prompts is None:
                raise ExportError("a text-conditional model needs --reference (its pipeline folder) and --prompts")
            from diffusers import DiffusionPipeline

            prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
            if not prompts:
                raise ExportError(f"{args.prompts} holds no prompts")
            pipeline = DiffusionPipeline.from_pretrained(args.reference)
            pipeline.set_progress_bar_config(disable=True)
            pipe_kwargs = {"pipeline": pipeline, "prompts": prompts, "guidance_scale": args.guidance_scale}
    except (ExportError, ModelFolderError, OSError, KeyError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    bits = f"W{meta['quant_config']['weight_bits']}A{meta['quant_config']['act_bits']}"
    sampler = f"{args.scheduler} {args.steps} steps eta={args.eta}" + (" + PTQD noise correction" if args.ptqd else "")
    if args.ptqd:
        log(f"quantized samples with PTQD noise correction ({meta['noise_correction']['steps']} measured steps); "
            "FP reference with the plain scheduler")
    log(f"{meta['recipe']} {bits} from {args.model} ({args.mode}); {args.num_samples} seeds from {args.seed}, "
        f"{sampler}, {world} rank(s)")

    # 2. quantized samples
    seeds = list(range(args.seed, args.seed + args.num_samples))
    t0 = time.time()
    q_images = sample_across_ranks(qunet, q_scheduler, seeds, args.steps, args.batch_size, args.eta, rank, world,
                                   desc=f"{bits} samples", **pipe_kwargs)
    sampling_seconds = time.time() - t0

    # 3. FP reference, cached
    fp_images = calls = None
    if fp is not None:
        settings = {"model_hash": model_hash(args.reference), "scheduler": dict(scheduler.config), "steps": args.steps,
                    "eta": args.eta, "seeds": [args.seed, args.num_samples], "batch_size": args.batch_size,
                    "fidelity_samples": args.fidelity_samples, "guidance_scale": args.guidance_scale,
                    "prompts": hashlib.sha256("\n".join(pipe_kwargs.get("prompts", [])).encode()).hexdigest()}
        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        key = reference_key(settings)
        cached = load_reference(cache_dir, key)
        if cached is not None:
            fp_images, calls = cached
            log(f"FP reference from cache {cache_dir / key}")
        else:
            fp_images = sample_across_ranks(fp, scheduler, seeds, args.steps, args.batch_size, args.eta, rank, world,
                                            desc="FP samples", **pipe_kwargs)
            calls = []
            if rank == 0:
                with recorded_calls(fp, calls):
                    sample_batch(fp, scheduler, seeds[:args.fidelity_samples], args.steps, args.eta, **pipe_kwargs)
                save_reference(cache_dir, key, settings, fp_images, calls)
                log(f"FP reference cached in {cache_dir / key}")

    # 4. metrics (rank 0)
    if rank == 0:
        metrics = {"model": args.model, "recipe": meta["recipe"], "bits": bits, "mode": args.mode,
                   "sampler": sampler, "num_samples": args.num_samples, "seeds": [args.seed, args.seed + args.num_samples],
                   "ptqd_noise_correction": args.ptqd, "world_size": world,
                   "sampling_seconds": round(sampling_seconds, 2),
                   "export_file_bytes": meta["size"]["file_bytes"]}
        if args.mode == "integer":
            report = qunet.qdistill_export["integer_report"]
            metrics["integer_layers"] = len(report["integer"])
            metrics["simulated_modules"] = sum(len(v) for v in report["simulated"].values())
        metrics.update(compute_metrics(args, q_images, fp_images, calls, qunet, pipe_kwargs))
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        grid = save_grid([from_uint8(x[:64]) for x in ([fp_images] if fp_images is not None else []) + [q_images]],
                         out / "samples.png")
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(out / "tb")) as writer:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"eval/{name}", value)
        log(f"wrote {out / 'metrics.json'} and {grid} ({'FP | quantized' if fp_images is not None else 'quantized'})")
        print_table(metrics)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def compute_metrics(args, q_images, fp_images, calls, qunet, pipe_kwargs) -> dict:
    from torchmetrics.functional.image import structural_similarity_index_measure

    metrics = {}
    q = from_uint8(q_images)
    fp = from_uint8(fp_images) if fp_images is not None else None
    classifier = Path(args.classifier)
    if (classifier / "config.json").is_file() and tuple(q.shape[1:]) == (1, 32, 32):
        from qdistill.evaluation.bench import bench_quality
        from qdistill.evaluation.bench_classifier import BenchClassifier
        from qdistill.evaluation.frechet import frechet_distance

        record = bench_quality(q, classifier)
        metrics.update(fd=record["fd"], min_class_share=record["min_class_share"])
        if fp is not None:
            metrics["fd_fp"] = bench_quality(fp, classifier)["fd"]
            metrics["delta_fd"] = metrics["fd"] - metrics["fd_fp"]
            metrics["fd_vs_fp_samples"] = frechet_distance(BenchClassifier.load(classifier).features, q, fp)
    if args.inception and fp_images is not None:
        from qdistill.evaluation.inception import inception_metrics, load_feature_network

        network = load_feature_network(args.inception)
        metrics.update({f"{k}_vs_fp": v for k, v in inception_metrics(network, q_images, fp_images).items()
                        if k != "is"})
        inception = inception_metrics(network, q_images, q_images)
        if "is" in inception:
            metrics["is"] = inception["is"]
            metrics["is_fp"] = inception_metrics(network, fp_images, fp_images)["is"]
    if fp is not None:
        metrics["psnr_db"] = float(psnr(q, fp).mean())
        metrics["ssim"] = float(structural_similarity_index_measure((q + 1) / 2, (fp + 1) / 2, data_range=1.0))
        per_step = noise_pred_mse_per_step(qunet, calls, args.steps)
        metrics["noise_pred_mse_mean"] = sum(per_step.values()) / len(per_step)
        metrics["noise_pred_mse_per_step"] = per_step
    if args.clip and pipe_kwargs:
        from qdistill.evaluation.clip import clip_score

        prompts = [pipe_kwargs["prompts"][s % len(pipe_kwargs["prompts"])]
                   for s in range(args.seed, args.seed + args.num_samples)]
        metrics["clip_score"] = clip_score(q_images, prompts, args.clip)
        if fp_images is not None:
            metrics["clip_score_fp"] = clip_score(fp_images, prompts, args.clip)
    return metrics


def print_table(metrics: dict) -> None:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())
