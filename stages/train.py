"""train: quantize a diffusers model block by block on DeepSpeed, by the config's `method`: DilateQuant (Weight
Dilation, TPQ, block-wise distillation) or Q-Diffusion (AdaRound, then activation step sizes).

1. load the FP model and this rank's calibration shards (recorded by `qdistill calibrate`);
2. quantize_ a copy (per `quant.*`: Weight Dilation, temporal parallel quantizers or one scale for all
   timesteps) and initialise every activation table from calibration rows (MSE search, the same on every rank);
3. train block by block through the recipe's phases (trainer/distill.py, trainer/recipes.py), then, with
   `distill.e2e_iterations`, the whole model end to end (trainer/end_to_end.py), checkpointing to OUT/checkpoint;
   an existing checkpoint in OUT is resumed (overwrite=true starts over);
4. save the quantized model to OUT/quantized; sample FP | quantized on fixed seeds (grid, PSNR, metrics.json,
   TensorBoard in OUT/tb).

Launched as one process, by `torchrun --nproc_per_node=N -m qdistill train ...`, or by the deepspeed launcher
(`deepspeed --num_gpus N --module qdistill train ...`); trainer/launch.py sets up the process group.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
import shutil
import time
from pathlib import Path

import torch

from ..analysis.layer_choice import resolve_keep_sensitive
from ..configs import to_dict
from ..configs.schema import TrainConfig
from ..data.calibration_set import load_shard_list, read_manifest, strided_batches
from ..data.model_folder import load_denoiser, load_scheduler, model_hash
from ..denoisers import text_dim
from ..devices import autocast
from ..distributed_env import check_shared_folders, from_rank0
from ..evaluation.fidelity import save_grid
from ..evaluation.sampling import compare_to_fp
from ..export import save_quantized
from ..files import atomic_write_text
from ..trainer.distill import BlockDistiller
from ..trainer.end_to_end import OWN_INPUTS, EndToEndDistiller
from ..trainer.launch import init_distributed, load_deepspeed_config, release_distributed
from ..trainer.recipes import recipe_phases
from ..trainer.row_plan import rank_share
from ..trainer.run_state import CHECKPOINT
from ..trainer.student import build_student

logger = logging.getLogger(__name__)
LAYER_SELECTION = "layer_selection.json"  # keep_sensitive=auto: the layers chosen and the sensitivity behind them


def train(cfg: TrainConfig) -> dict | None:
    """Train `cfg.out`; returns the metrics written to OUT/metrics.json on rank 0 (None on the others)."""
    ds_config = load_deepspeed_config(cfg.deepspeed)
    phases = recipe_phases(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world_size, device = init_distributed(cfg.device, cfg.timeout_minutes)
    try:
        return _train(cfg, ds_config, phases, rank, world_size, device)
    finally:
        release_distributed()


def _train(cfg: TrainConfig, ds_config: dict, phases, rank: int, world_size: int, device) -> dict | None:
    out = Path(cfg.out)
    log = logger.info if rank == 0 else (lambda msg: None)
    # 1. the FP model and the calibration shards (first: every rank sees the one OUT and trajectories folder, or
    # all stop with the same error, rather than resume from different checkpoints and hang)
    check_shared_folders({"trajectories": Path(cfg.trajectories)}, rank, world_size, write={"out": out})
    fp = load_denoiser(cfg.model).eval().to(device)  # fp32 weights; precision=bf16 runs the forwards under autocast
    source_hash = from_rank0(lambda: model_hash(cfg.model), rank, world_size)  # hashed once, not per rank
    manifest = read_manifest(cfg.trajectories)
    share = rank_share([s["rows"] for s in manifest["shards"]], cfg.distill.batch_size, rank, world_size)
    # every rank opens all shards (memory-mapped): the TPQ init reads rows of each; training reads the few its
    # slice of every batch covers (trainer/row_plan.py)
    all_shards = load_shard_list(cfg.trajectories, source_hash)
    log(f"{type(fp).__name__} from {cfg.model}; {manifest['num_rows']} calibration rows in "
        f"{len(manifest['shards'])} shards; {world_size} rank(s) on {device}, {cfg.precision}; {cfg.quant.tag} "
        f"{cfg.method}; rank 0 trains on shards {', '.join(str(sid) for sid, _, _ in share)}")
    if cfg.overwrite and rank == 0:
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        shutil.rmtree(out / OWN_INPUTS, ignore_errors=True)
    if world_size > 1:
        torch.distributed.barrier()
    resuming = (out / CHECKPOINT).exists()

    # 2. quantize (keep_sensitive=auto: the layers kept at higher precision chosen first, once per run); TPQ rows
    # per timestep (skipped when resuming: the checkpoint holds the tables)
    t0 = time.time()
    dtype = next(fp.parameters()).dtype
    rows = lambda n: strided_batches(all_shards, n, cfg.distill.batch_size, device, dtype, fp)  # noqa: E731
    quant = resolve_keep_sensitive(fp, cfg.quant, lambda: rows(cfg.distill.init_rows),
                                   lambda: rows(cfg.quant.keep_sensitive_rows),
                                   load_scheduler(cfg.model).config.num_train_timesteps, out / LAYER_SELECTION,
                                   reuse=resuming, seed=cfg.distill.seed,
                                   on_rank0=lambda choose: from_rank0(choose, rank, world_size))
    cfg = dataclasses.replace(cfg, quant=quant)  # what the checkpoint, the export and metrics.json record
    student, blocks_fp, blocks_q = build_student(fp, cfg, all_shards, device, calibrate=not resuming,
                                                  rank=rank, world_size=world_size)
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
    distiller = BlockDistiller(fp, student, blocks_fp, blocks_q, all_shards, cfg.distill, ds_config, out, rank,
                               world_size, writer,
                               run_config={"method": cfg.method, "quant": to_dict(cfg.quant),
                                           "distill": to_dict(cfg.distill), "qdiffusion": to_dict(cfg.qdiffusion),
                                           "model": cfg.model, "trajectories": cfg.trajectories},
                               phases=phases, precision=cfg.precision)
    t0 = time.time()
    summaries = distiller.run()
    # 3b. end to end: the whole model against FP's noise prediction, after the blocks
    e2e = EndToEndDistiller(distiller, cfg.trajectories).run() if cfg.distill.e2e_iterations else None
    train_seconds = time.time() - t0

    # 4. the result, and how close it is to FP
    peak_rss_mb = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, device=device)
    torch.distributed.all_reduce(peak_rss_mb, op=torch.distributed.ReduceOp.MAX)
    peak_gpu_mb = None
    if device.type == "cuda":
        peak_gpu_mb = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**20, device=device)
        torch.distributed.all_reduce(peak_gpu_mb, op=torch.distributed.ReduceOp.MAX)
        peak_gpu_mb = round(peak_gpu_mb.item(), 1)
    metrics = None
    if rank == 0:
        save_quantized(student, out / "quantized", recipe=cfg.method, source_model=str(cfg.model),
                       source_model_hash=source_hash, run_config=to_dict(cfg))
        metrics = {"recipe": cfg.method, "bits": cfg.quant.tag, "world_size": world_size, "deepspeed": cfg.deepspeed,
                   "device": str(device), "precision": cfg.precision,
                   "batch_size": cfg.distill.batch_size, "train_seconds": round(train_seconds, 2),
                   "peak_rss_mb_per_rank": round(peak_rss_mb.item(), 1), "peak_gpu_mb_per_rank": peak_gpu_mb,
                   "layer_bits": cfg.quant.layer_bits, "blocks": summaries, "e2e": e2e}
        if text_dim(fp):
            log("text-conditional model: the FP | quantized sample grid needs the pipeline; skipped (see `qdistill eval`)")
        else:
            s = cfg.sampling
            scheduler = load_scheduler(cfg.model, s.scheduler)
            with autocast(device, cfg.precision):
                fp_final, q_final, fidelity = compare_to_fp(fp, student, scheduler,
                                                            range(s.seed, s.seed + s.num_samples), s.steps,
                                                            s.batch_size, s.eta)
            metrics.update(fidelity, sampler=f"{s.scheduler} {s.steps} steps eta={s.eta}")
            grid = save_grid([fp_final, q_final], out / "samples.png")
            import numpy as np
            from PIL import Image

            writer.add_image("samples/fp_vs_quantized", np.asarray(Image.open(grid).convert("RGB")), dataformats="HWC")
            writer.add_scalar("eval/psnr_db", fidelity["psnr_db"])
            log(f"vs FP on {s.num_samples} seeds ({metrics['sampler']}): PSNR {fidelity['psnr_db']:.2f} dB, "
                f"noise-prediction MSE {fidelity['noise_pred_mse_mean']:.3e}; grid {grid} (FP | quantized)")
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        writer.close()
        log(f"{len(summaries)} blocks in {train_seconds:.1f}s; quantized model in {out / 'quantized'}")
    torch.distributed.barrier()
    return metrics
