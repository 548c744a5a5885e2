"""End-to-end distillation after the blocks (`distill.e2e_iterations`, docs/design.md §3.5's loss over the whole model).

A block-wise loss sees each block's output given its own input, not the error the blocks pass on to each other
(BENCHMARKS.md: at equal updates, end-to-end training reached 24.8 dB PSNR vs FP against block-wise's 16.5). This
phase, after the last block, trains the whole quantized model against the FP model's noise prediction,

    L = MSE( ε̂(x_t, t, c), ε_FP(x_t, t, c) )

on mixed-timestep batches of calibration rows (each sample its own timestep's TPQ row), every learnable
parameter at once: weights at `e2e_lr_weights`, step sizes at `e2e_lr_quant` times their scale, zero points
(trainer/phases.parameter_groups). The inputs x_t are the FP trajectories' (`e2e_inputs: fp`) or the quantized
model's own trajectories from the same seeds, noise, conditioning and sampler (`e2e_inputs: quantized`: the
inputs it will actually see), sampled once when the phase starts and kept in OUT/e2e_inputs/ so that a resumed run
trains on what an uninterrupted one would. The target is the FP model's prediction on the same input.

It runs like a block's phase (trainer/distill.py's loop): one DeepSpeed engine over the whole student (ZeRO 0-2
as configured; `e2e_checkpointing` turns on the model's own activation checkpointing, diffusers'
`enable_gradient_checkpointing`), the same data-parallel row plan on a stream of its own, the same held-out rows
and never-worse rule (the whole model's held-out MSE at the start, every `eval_every` iterations and at the end; a
worse end is reverted to the best state), checkpoints every `checkpoint_every` iterations (the whole student, the
engine and the best state), TensorBoard under loss/e2e.
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.calibration_set import COND_COLUMNS, read_manifest, shard_name
from ..data.trajectories import Conditioning, record_trajectories
from ..denoisers import noise_prediction
from ..devices import autocast, cast_inputs
from ..errors import ConfigError
from ..files import atomic_write_bytes
from .best_state import BestState
from .distill import BlockDistiller, release_engine
from .phases import DistillPhase, parameter_groups, per_sample_mse
from .run_state import DistillState

logger = logging.getLogger(__name__)
E2E_STREAM = -2  # the row plan's block index of this phase (blocks draw with 0, 1, ..., the held-out rows with -1)
OWN_INPUTS = "e2e_inputs"  # OUT/e2e_inputs/shard-NNNNN.safetensors: the quantized model's own x_t of each row


class EndToEndPhase(DistillPhase):
    """Every learnable parameter of the whole model, at the end-to-end learning rates."""

    name = "e2e"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.iterations = cfg.e2e_iterations

    def param_groups(self, model):
        return parameter_groups(model, self.cfg.e2e_lr_weights, self.cfg.e2e_lr_quant)


class EndToEndDistiller:
    """The end-to-end phase of `blocks`' run (its data, row plan, held-out rows, checkpoint and logging).
    `trajectories` is the calibration folder (its manifest gives the sampler for `e2e_inputs: quantized`)."""

    def __init__(self, blocks: BlockDistiller, trajectories: str | Path):
        self.d, self.cfg = blocks, blocks.cfg
        self.trajectories = Path(trajectories)
        self.phase = EndToEndPhase(self.cfg)
        self.own: list[dict] | None = None  # per shard of this rank's share: {"x_t": the quantized model's own}
        self.state: dict = {}  # where the phase stands (checkpointed in progress.json under "e2e")

    # -- data ---------------------------------------------------------------------------------------
    def _data(self, rows: list[torch.Tensor]) -> dict:
        """The model inputs of `rows` (per shard of this rank's share) and the FP model's prediction on them."""
        d = self.d
        kwargs = d._model_inputs(torch.cat([r + off for r, off in zip(rows, d.offsets)]), self.own)
        with torch.no_grad(), autocast(d.device, d.precision):
            target = noise_prediction(d.teacher(**kwargs)).float()
        return {"args": (), "kwargs": kwargs, "target": target, "t": kwargs["timestep"]}

    def _own_inputs(self) -> list[dict]:
        """The quantized model's own trajectory inputs for every row of this rank's shards: each shard's seeds
        sampled as the calibration run sampled them (same noise, conditioning, scheduler and steps), the row's x_t
        taken at its step. Shard s is sampled by rank s % world_size and written once; a resumed run reads it."""
        from safetensors.torch import load_file, save

        d, folder = self.d, self.d.out / OWN_INPUTS
        manifest = read_manifest(self.trajectories)
        mine = [sid for sid in range(len(d.all_shards)) if sid % d.world_size == d.rank
                and not (folder / f"{shard_name(sid)}.safetensors").exists()]
        if mine:
            scheduler = _scheduler(manifest)
            d._log(f"end-to-end inputs: sampling the quantized model's own trajectories ({len(mine)} shard(s) on "
                   f"rank 0, {manifest['num_steps']} steps each) into {folder}")
            folder.mkdir(parents=True, exist_ok=True)
        for sid in mine:
            x_t = _sample_shard(d.student, scheduler, d.all_shards[sid], manifest, d.device, d.precision)
            atomic_write_bytes(folder / f"{shard_name(sid)}.safetensors", save({"x_t": x_t.cpu().contiguous()}))
        if d.world_size > 1:
            dist.barrier()
        return [{"x_t": load_file(str(folder / f"{shard_name(sid)}.safetensors"))["x_t"]} for sid, _, _ in d.share]

    # -- the phase ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """The whole model's noise-prediction MSE against FP on the held-out rows, as it is now."""
        d = self.d
        data = self._data([held[a:b] for (_, a, b), held in zip(d.share, d.held)])
        with autocast(d.device, d.precision):
            out = d.student(**data["kwargs"])
        return d._mean_over_ranks(per_sample_mse(out, data["target"]).mean()).item()

    def save(self, iteration: int, engine=None) -> None:
        self.state["iteration"] = iteration
        if self.d.best is not None:
            self.state["best"] = self.d.best.info()
        self.d.current.pop("best", None)  # the loop records the best state there for blocks; this phase's is in state
        self.d.save_checkpoint(DistillState(self.d.blocks_done, 0), engine, e2e=self.state)

    def run(self) -> dict:
        """Train (or resume) the phase; returns its summary (also kept in the checkpoint)."""
        d, cfg, student = self.d, self.cfg, self.d.student
        progress = d.checkpoint.read_progress() or {}
        self.state = dict(progress.get("e2e") or {})
        if self.state.get("finished"):
            d._log("end-to-end phase: finished in the checkpoint")
            return self.state["summary"]
        start = int(self.state.get("iteration", 0))
        if cfg.e2e_inputs == "quantized":
            self.own = self._own_inputs()
        if cfg.e2e_checkpointing:
            if not getattr(student, "_supports_gradient_checkpointing", False):
                raise ConfigError(f"distill.e2e_checkpointing: {type(student).__name__} has no activation "
                                  "checkpointing (diffusers' enable_gradient_checkpointing); set it to false")
            student.enable_gradient_checkpointing()
        t0 = time.time()
        if not start:
            self.state = {"init_mse": self.evaluate(), "inputs": cfg.e2e_inputs}
        if cfg.keep_best:
            saved = d.checkpoint.load_best(d.device) if start else None
            best = self.state.get("best") or {"mse": self.state["init_mse"], "where": "start"}
            d.best = BestState(student, best["mse"], best["where"], saved, self.state["init_mse"])
        self.phase.enter(student)
        engine = d._engine(student, self.phase, self.phase.param_groups(student))
        try:
            if start:
                d._log(f"resuming the end-to-end phase at iteration {start}")
                d.checkpoint.load_engine(engine)
            summary = d.train_loop(engine, self.phase, student, start, lambda it: self._data(d._rows(E2E_STREAM, it)),
                                   "e2e", "end-to-end", d.phase_offsets[-1] * len(d.blocks_q), self.evaluate,
                                   lambda it: self.save(it, engine))
        finally:
            release_engine(engine)
            engine = None  # the engine holds Adam's state for the whole model: free it before the final evaluation
            gc.collect()
            self.phase.leave(student)
            if cfg.e2e_checkpointing:
                student.disable_gradient_checkpointing()
        final = self.evaluate()
        kept = "end"
        if d.best is not None and final > d.best.mse:
            d.best.restore(student)
            kept = d.best.where
            d._log(f"end-to-end: training ended at held-out MSE {final:.3e}, worse than at {kept} ({d.best.mse:.3e}); "
                   "reverted to that state")
        best_mse = d.best.mse if kept != "end" else final
        d.best = None
        summary.update(iterations=cfg.e2e_iterations, seconds=round(time.time() - t0, 3), inputs=cfg.e2e_inputs,
                       init_mse=self.state["init_mse"], final_mse=final, best_mse=best_mse, kept=kept)
        self.state = {"finished": True, "iteration": cfg.e2e_iterations, "init_mse": summary["init_mse"],
                      "summary": summary}
        self.save(cfg.e2e_iterations)
        if d.writer is not None:
            for key in ("init_mse", "final_mse", "best_mse"):
                d.writer.add_scalar(f"e2e/{key}", summary[key], cfg.e2e_iterations)
        d._log(f"end-to-end: held-out noise-prediction MSE {summary['init_mse']:.3e} -> {final:.3e}"
               + (f"; kept {best_mse:.3e} ({kept})" if kept != "end" else ""))
        return summary


def _scheduler(manifest: dict):
    """The calibration run's scheduler, rebuilt from the manifest."""
    import diffusers

    info = manifest["scheduler"]
    return getattr(diffusers, info["class"]).from_config(info["config"])


def _sample_shard(model, scheduler, shard, manifest: dict, device, precision: str) -> torch.Tensor:
    """x_t of every row of `shard` on `model`'s own trajectory: the shard's seeds as one batch (as calibration
    recorded them), each row's conditioning from its own columns."""
    cols = shard[:]
    ids = cols["sample_id"].tolist()
    seeds = list(dict.fromkeys(ids))
    first = [ids.index(s) for s in seeds]
    fields = cast_inputs({field: cols[column][first] for column, field in COND_COLUMNS.items() if column in cols},
                         device, next(model.parameters()).dtype)
    cond = Conditioning(**fields, guidance_scale=manifest.get("guidance_scale", 1.0)) if fields else None
    steps = sorted(set(cols["step"].tolist()))
    with torch.no_grad(), autocast(device, precision):
        _, records = record_trajectories(model, scheduler, seeds, manifest["num_steps"], len(seeds),
                                         manifest.get("eta", 0.0), steps, (lambda chunk: cond) if cond else None,
                                         manifest.get("sample_size"))
    at = {(r.step, s): r.sample[j] for r in records for j, s in enumerate(r.seeds)}
    return torch.stack([at[(step, seed)] for step, seed in zip(cols["step"].tolist(), ids)]).float()
