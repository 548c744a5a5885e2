"""Quantize a diffusers model block by block on DeepSpeed: DilateQuant (Weight Dilation, TPQ, block-wise
distillation) or Q-Diffusion (AdaRound, then activation step sizes), chosen by the config's `recipe`.

    python scripts/train.py --config configs/dilatequant.yaml [key=value ...]
    python scripts/train.py --config configs/qdiffusion.yaml [quant.weight_bits=4 quant.act_bits=4 out=...]
    torchrun --standalone --nproc_per_node=2 scripts/train.py --config configs/dilatequant.yaml
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 scripts/train.py --config configs/dilatequant.yaml

1. load the FP model and this rank's calibration shards (recorded by scripts/calibrate.py);
2. quantize_ a copy (per `quant.*`: Weight Dilation, temporal parallel quantizers or one scale for all
   timesteps) and initialise every activation table from calibration rows (MSE search, the same on every rank);
3. train block by block through the recipe's phases (trainer/distill.py, trainer/recipes.py), checkpointing to
   OUT/checkpoint; an existing checkpoint in OUT is resumed (overwrite=true starts over);
4. save the quantized model to OUT/quantized; sample FP | quantized on fixed seeds (grid, PSNR, metrics.json,
   TensorBoard in OUT/tb).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from qdistill.configs import ConfigError, load_config, to_dict
from qdistill.configs.schema import TrainConfig
from qdistill.data.calibration_set import CalibrationSetError, load_shard_list, read_manifest
from qdistill.data.model_folder import ModelFolderError, load_scheduler, load_unet, model_hash
from qdistill.evaluation.fidelity import compare_to_fp, save_grid
from qdistill.trainer.checkpoint import CheckpointError, atomic_write_text, save_quantized
from qdistill.trainer.distill import CHECKPOINT, BlockDistiller, DivergenceError
from qdistill.trainer.launch import init_distributed, load_deepspeed_config
from qdistill.trainer.recipes import recipe_phases
from qdistill.trainer.student import build_student


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="YAML config (configs/dilatequant*.yaml, configs/qdiffusion.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        ds_config = load_deepspeed_config(cfg.deepspeed)
        phases = recipe_phases(cfg)
    except ConfigError as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world_size, device = init_distributed()
    out = Path(cfg.out)
    log = (lambda msg: print(f"[train] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    try:
        # 1. the FP model and the calibration shards
        fp = load_unet(cfg.model).eval().to(device)
        source_hash = model_hash(cfg.model)
        manifest = read_manifest(cfg.trajectories)
        shards = load_shard_list(cfg.trajectories, rank, world_size, source_hash)
        shard_ids = list(range(rank, len(manifest["shards"]), world_size))
        all_shards = shards if world_size == 1 else load_shard_list(cfg.trajectories, 0, 1, source_hash)
        log(f"{type(fp).__name__} from {cfg.model}; {manifest['num_rows']} calibration rows in "
            f"{len(manifest['shards'])} shards; {world_size} rank(s) on {device}; "
            f"W{cfg.quant.weight_bits}A{cfg.quant.act_bits} {cfg.recipe}")
        if cfg.overwrite and rank == 0:
            shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        if world_size > 1:
            torch.distributed.barrier()
        resuming = (out / CHECKPOINT).exists()

        # 2. quantize; TPQ rows per timestep (skipped when resuming: the checkpoint holds the tables)
        t0 = time.time()
        student, blocks_fp, blocks_q = build_student(fp, cfg, all_shards, device, calibrate=not resuming)
        if not resuming:
            scales = "per-timestep activation scales" if cfg.quant.per_timestep else "one activation scale"
            log(f"quantized ({'weight dilation, ' if cfg.quant.weight_dilation else ''}{scales} from "
                f"{cfg.distill.init_rows} rows) in {time.time() - t0:.1f}s; {len(blocks_q)} blocks, "
                f"phases {', '.join(ph.name for ph in phases)}")

        # 3. block-wise training, phase by phase
        writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        distiller = BlockDistiller(fp, student, blocks_fp, blocks_q, shards, shard_ids, len(manifest["shards"]),
                                   cfg.distill, ds_config, out, rank, world_size, writer,
                                   run_config={"recipe": cfg.recipe, "quant": to_dict(cfg.quant),
                                               "distill": to_dict(cfg.distill), "qdiffusion": to_dict(cfg.qdiffusion),
                                               "model": cfg.model, "trajectories": cfg.trajectories},
                                   phases=phases)
        t0 = time.time()
        summaries = distiller.run()
        train_seconds = time.time() - t0
    except (ConfigError, ModelFolderError, CalibrationSetError, CheckpointError, DivergenceError, ValueError) as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        torch.distributed.destroy_process_group()
        return 2

    # 4. the result, and how close it is to FP
    peak_rss_mb = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    torch.distributed.all_reduce(peak_rss_mb, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        save_quantized(student, out / "quantized", recipe=cfg.recipe, source_model=str(cfg.model),
                       source_model_hash=source_hash, run_config=to_dict(cfg))
        metrics = {"recipe": cfg.recipe, "bits": f"W{cfg.quant.weight_bits}A{cfg.quant.act_bits}",
                   "world_size": world_size, "deepspeed": cfg.deepspeed, "batch_size": cfg.distill.batch_size,
                   "train_seconds": round(train_seconds, 2),
                   "peak_rss_mb_per_rank": round(peak_rss_mb.item(), 1), "blocks": summaries}
        if fp.config.get("num_class_embeds") or hasattr(fp.config, "cross_attention_dim"):
            log("conditional model: the FP | quantized sample grid needs conditioning; skipped (see scripts/eval.py)")
        else:
            s = cfg.sampling
            scheduler = load_scheduler(cfg.model, s.scheduler)
            fp_final, q_final, fidelity = compare_to_fp(fp, student, scheduler, range(s.seed, s.seed + s.num_samples),
                                                        s.num_steps, s.batch_size, s.eta)
            metrics.update(fidelity, sampler=f"{s.scheduler} {s.num_steps} steps eta={s.eta}")
            grid = save_grid([fp_final, q_final], out / "samples.png")
            from PIL import Image
            import numpy as np

            writer.add_image("samples/fp_vs_quantized", np.asarray(Image.open(grid).convert("RGB")), dataformats="HWC")
            writer.add_scalar("eval/psnr_db", fidelity["psnr_db"])
            log(f"vs FP on {s.num_samples} seeds ({metrics['sampler']}): PSNR {fidelity['psnr_db']:.2f} dB, "
                f"noise-prediction MSE {fidelity['noise_pred_mse_mean']:.3e}; grid {grid} (FP | quantized)")
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        writer.close()
        log(f"{len(summaries)} blocks in {train_seconds:.1f}s; quantized model in {out / 'quantized'}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
