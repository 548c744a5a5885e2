"""Block-wise training of a quantized model on DeepSpeed (docs/design.md §3.5, §3.6, §4).

For each block k, in execution order, the quantized block learns to match its FP twin, e.g. (DilateQuant BKD)

    L = MSE( B̂_k(input from the quantized chain), B_k(input from the FP chain) )

What learns and against which loss is the recipe's: a list of phases that every block goes through in order
(trainer/phases.py: DilateQuant's one BKD phase; trainer/qdiffusion.py: AdaRound, then activation step sizes).
Block inputs and targets come from hooks on the live models (a forward pre-hook captures the block's call
and stops the forward), with the blocks before it returning their carried outputs instead of running
(trainer/block_inputs.py): about one teacher and one student forward of the block per row. They are computed
once per block for all of this rank's rows and kept within `cache_mb` (memory) and `cache_disk_mb` (local
disk), otherwise captured again for every batch. One DeepSpeed engine per phase of a block, with the
phase's parameter groups and learning rates.

Never worse than the start (`distill.keep_best`, trainer/best_state.py): every block's output MSE is measured on
one held-out batch (rows no iteration trains on, the same for every block) before its first phase, every
`eval_every` iterations, and at the end of each phase; a phase that ends worse than the best state it reached
(its start included) is reverted to that state and reported. Summaries record `init_mse` (before training),
`final_mse` (where training ended) and `best_mse` (what the block keeps).

Data parallel over calibration rows (trainer/row_plan.py): every iteration takes a fixed number of rows from
every shard, drawn by a pure function of (seed, block, iteration, shard), and each rank trains on an equal slice
of that global batch, so the batch is the same whatever the number of ranks, a resumed run draws what an
uninterrupted one would, and each rank reads only the shards its slice covers. Every batch mixes timesteps;
each sample uses its own timestep's quantizer row.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..data.calibration_set import to_model_inputs
from ..devices import autocast, cast_inputs
from ..errors import DivergenceError
from ..progress import progress
from ..quantizers import Block, set_timesteps
from .best_state import BestState
from .block_graph import trace_block_graph
from .block_inputs import BlockInputs
from .phases import DistillPhase, Phase, per_sample_mse
from .row_plan import draw_rows, held_out_rows, rank_share, rows_per_shard
from .row_store import StorageBudget
from .run_state import CHECKPOINT, DistillState, RunCheckpoint
from .tb_logging import log_block, log_scalars

logger = logging.getLogger(__name__)


def release_engine(engine) -> None:
    """Free a finished phase's engine. `destroy()` removes ZeRO's gradient hooks, but the engine's own forward
    hooks stay on the block: they keep the engine and its optimizer state alive and run on every later forward."""
    engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)


class BlockDistiller:
    """Train `student` (quantize_'d and calibrated) towards `teacher`, block by block, phase by phase.

    `shards` are all the calibration shards of the set (torch-formatted datasets, in shard order; a rank reads
    only those its share covers, `rank_share`). `cfg` is a DistillConfig; `ds_config` the
    DeepSpeed config dict (batch sizes are filled in here); `phases` the recipe's (default: DilateQuant's
    one BKD phase from `cfg`).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, blocks_fp: list[Block], blocks_q: list[Block],
                 shards: list, cfg, ds_config: dict, out: str | Path,
                 rank: int = 0, world_size: int = 1, writer=None, run_config: dict | None = None,
                 phases: list[Phase] | None = None, precision: str = "fp32"):
        if [b.name for b in blocks_fp] != [b.name for b in blocks_q]:
            raise ValueError("teacher and student blocks differ: " f"{[b.name for b in blocks_fp]} vs {[b.name for b in blocks_q]}")
        self.teacher, self.student = teacher, student
        self.blocks_fp, self.blocks_q = blocks_fp, blocks_q
        self.cfg, self.out = cfg, Path(out)
        self.rank, self.world_size, self.writer = rank, world_size, writer
        self.run_config = run_config or {}
        self.phases = phases if phases is not None else [DistillPhase(cfg)]
        # where each phase's iterations start inside a block: its batches and TensorBoard steps
        self.phase_offsets = [sum(ph.iterations for ph in self.phases[:i]) for i in range(len(self.phases) + 1)]
        # this rank's slice of every iteration's batch: (shard, first, end) of each shard's draw
        self.shard_lengths = [len(shard) for shard in shards]
        self.share = rank_share(self.shard_lengths, cfg.batch_size, rank, world_size)
        self.counts = rows_per_shard(len(shards), cfg.batch_size)
        # per shard of this rank: the held-out evaluation rows and the rows iterations draw from
        self.held, self.pools = zip(*(held_out_rows(cfg.seed, sid, self.shard_lengths[sid], self.counts[sid])
                                      for sid, _, _ in self.share))
        self.all_shards = shards
        self.shards = [shards[sid] for sid, _, _ in self.share]
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + len(s))
        self.ds_config = dict(ds_config)
        self.ds_config.update(train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
                              train_micro_batch_size_per_gpu=cfg.batch_size // world_size)
        self.summaries: list[dict] = []
        self.current: dict = {}  # the block in progress: its initial MSE and finished phases (checkpointed)
        self.device, self.dtype = next(student.parameters()).device, next(student.parameters()).dtype
        self.precision = precision  # bf16/fp16: every forward under autocast; parameters, loss and Adam in fp32
        if precision in ("bf16", "fp16"):
            # The engine's forward must know: under an outer CUDA autocast it turns autocast off unless its own
            # section is on. fp16's section also brings a dynamic loss scaler (overflowing steps are skipped). No
            # module is listed, so gradients are reduced in fp32, as the parameters are.
            self.ds_config["torch_autocast"] = {"enabled": True, "lower_precision_safe_modules": [],
                                                "dtype": {"bf16": "bfloat16", "fp16": "float16"}[precision]}
        self.checkpoint = RunCheckpoint(self.out, rank, world_size)
        self.best: BestState | None = None  # the block's best state in the phase under way (keep_best)

    # -- data ---------------------------------------------------------------------------------------
    def _rows(self, block_index: int, iteration: int) -> list[torch.Tensor]:
        return [pool[draw_rows(self.cfg.seed, block_index, iteration, sid, len(pool), self.counts[sid])][a:b]
                for (sid, a, b), pool in zip(self.share, self.pools)]

    def _model_inputs(self, rows: torch.Tensor, replace: list[dict] | None = None) -> dict:
        """Model kwargs of `rows`: indices into this rank's shards, one after another, grouped by shard.
        `replace`: per shard, columns (tensors over its rows) used instead of the shard's own."""
        parts, order = [], []
        for i, (shard, a, b) in enumerate(zip(self.shards, self.offsets, self.offsets[1:])):
            local = rows[(rows >= a) & (rows < b)]
            if len(local):
                part = shard[(local - a).tolist()]
                if replace is not None:
                    part.update({key: column[local - a] for key, column in replace[i].items()})
                parts.append(part)
                order.append(local)
        assert torch.equal(torch.cat(order), rows), "rows must be grouped by shard, in shard order"
        batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        return cast_inputs(to_model_inputs(batch, self.teacher), self.device, self.dtype)

    def _block_inputs(self) -> BlockInputs:
        """Block calls for all of this rank's rows, chunk by chunk (a chunk is `batch_size` rows of one shard)."""
        chunks = [(a + start, min(self.cfg.batch_size, len(shard) - start))
                  for shard, a in zip(self.shards, self.offsets) for start in range(0, len(shard), self.cfg.batch_size)]
        graph = None
        if self.cfg.capture == "carry":
            with autocast(self.device, self.precision):
                graph = trace_block_graph(self.teacher, [b.module for b in self.blocks_fp],
                                          self._model_inputs(torch.arange(min(2, self.offsets[-1]))))
            if graph is None:
                self._log("the model's blocks do not run once each in order: block inputs are captured by running "
                          "the model up to each block (distill.capture=prefix)")
        budget = StorageBudget(self.cfg.cache_mb, self.cfg.cache_disk_mb, self.cfg.cache_dir)
        return BlockInputs(self.teacher, self.student, self.blocks_fp, self.blocks_q, chunks, self._model_inputs,
                           self.cfg.block_input == "quantized", budget, graph, self.device, self.precision, self.rank)

    def _batch(self, rows: list[torch.Tensor]) -> dict:
        return self.block_inputs.batch(torch.cat([r + off for r, off in zip(rows, self.offsets)]))

    # -- checkpoints (trainer/run_state.py) ---------------------------------------------------------
    def save_checkpoint(self, state: DistillState, engine=None, e2e: dict | None = None) -> None:
        """Checkpoint `state` (with the live engine inside a block or the end-to-end phase). Inside a phase the
        student's state holds what the phase added to it (AdaRound's α). `e2e`: where the end-to-end phase after
        the blocks stands (trainer/end_to_end.py); it changes the whole student, so all of it is written."""
        phase = self.phases[state.phase].name if state.phase < len(self.phases) else None
        if e2e is not None:
            block = None
        elif state.iteration or state.phase:  # inside block k: only it has changed since the last checkpoint
            block = (state.block_index, self.blocks_q[state.block_index].name, False)
        else:  # block k - 1 has just finished
            block = (state.block_index - 1, self.blocks_q[state.block_index - 1].name, True) if state.block_index else None
        inside = state.iteration or (e2e is not None and e2e.get("iteration") and not e2e.get("finished"))
        best = self.best.state if inside and self.best is not None else None
        self.checkpoint.save(self.student, {
            "block_index": state.block_index, "phase": state.phase, "phase_name": phase,
            "iteration": state.iteration, "blocks": [b.name for b in self.blocks_q], "summaries": self.summaries,
            "current_block": self.current, "run_config": self.run_config, "e2e": e2e}, engine, block, best)

    def load_checkpoint(self) -> DistillState:
        """The state to start from: a fresh one, or the run folder's checkpoint (student state loaded; a block
        stopped inside a phase has that phase entered again first, so the state it added loads too)."""
        progress = self.checkpoint.read_progress()
        if progress is None:
            return DistillState()
        self.checkpoint.check(progress, [b.name for b in self.blocks_q], [ph.name for ph in self.phases],
                              self.run_config)
        state = progress["state"]
        if state.iteration:
            self.phases[state.phase].enter(self.blocks_q[state.block_index].module)
        self.checkpoint.load_student(self.student)
        self.checkpoint.load_rng()
        self.summaries = progress.get("summaries", [])
        self.current = progress.get("current_block") or {}
        best = self.current.get("best") if state.iteration else None  # a best state exists inside a phase only
        saved = self.checkpoint.load_best(self.device) if best is not None else None
        if saved is not None:
            self.best = BestState(self.blocks_q[state.block_index].module, best["mse"], best["where"], saved,
                                  best["start"])
        return state

    # -- training -----------------------------------------------------------------------------------
    def _engine(self, block: nn.Module, phase: Phase, groups: list[dict]):
        import deepspeed

        optimizer = torch.optim.Adam(groups)
        engine, *_ = deepspeed.initialize(
            model=block, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, phase.lr_factor))
        return engine

    def run(self) -> list[dict]:
        self.teacher.eval()
        self.student.eval()  # eval mode throughout: dropout off, so a block's training is deterministic
        for p in self.student.parameters():
            p.requires_grad_(False)
        state = self.load_checkpoint()
        if state.block_index or state.iteration or state.phase:
            where = self.blocks_q[state.block_index].name if state.block_index < len(self.blocks_q) else "end"
            phase = f" phase {self.phases[state.phase].name}," if len(self.phases) > 1 and where != "end" else ""
            self._log(f"resuming at block {state.block_index + 1} ({where}),{phase} iteration {state.iteration}")
        last = len(self.blocks_q) if self.cfg.max_blocks is None else min(self.cfg.max_blocks, len(self.blocks_q))
        self.blocks_done = max(last, state.block_index)  # where the run stands once the blocks are trained
        self.block_inputs = self._block_inputs()
        self.block_inputs.last = last
        # What exists now lives for the whole run: frozen, it is left out of the collections that free each
        # phase's engine (a full collection of a large process's heap costs more than a small block's training)
        gc.freeze()
        try:
            if state.block_index and state.block_index < last and self.block_inputs.graph is not None:
                self._log(f"carrying the outputs of the {state.block_index} finished blocks")
                for k in range(state.block_index):
                    self.block_inputs.skip(k)
            for k in range(state.block_index, last):
                resumed = k == state.block_index
                self._train_block(k, state.phase if resumed else 0, state.iteration if resumed else 0)
                self.current = {}
                self.save_checkpoint(DistillState(k + 1, 0))
        finally:
            self.block_inputs.close()
            gc.unfreeze()
        return self.summaries

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(x)
            x /= self.world_size
        return x

    @torch.no_grad()
    def evaluate(self, k: int) -> float:
        """Block k's output MSE against the FP block on the held-out batch, as it is now."""
        block = self.blocks_q[k].module
        data = self._batch([held[a:b] for (_, a, b), held in zip(self.share, self.held)])
        set_timesteps(block, data["t"])
        with autocast(self.device, self.precision):
            out = block(*data["args"], **data["kwargs"])
        mse = per_sample_mse(out, data["target"]).mean()
        return self._mean_over_ranks(mse).item()

    def _train_block(self, k: int, first_phase: int, start: int) -> None:
        """Phases `first_phase`, ... of block k, the first one from iteration `start` (a resumed checkpoint's)."""
        name, block = self.blocks_q[k].name, self.blocks_q[k].module
        t0 = time.time()
        self.block_inputs.begin(k)
        cache_seconds, cached = time.time() - t0, self.block_inputs.cached
        if not self.current:
            self.current = {"init_mse": self.evaluate(k), "phases": []}
        for p in range(first_phase, len(self.phases)):
            phase, begin = self.phases[p], start if p == first_phase else 0
            if not begin:  # a resumed phase was entered before its checkpoint was loaded (and its best state)
                if self.cfg.keep_best:  # before enter: a phase that adds state (AdaRound's α) is undone whole
                    done = self.current["phases"]  # the block as the previous phase left it, or untrained
                    self.best = BestState(block, done[-1]["best_mse"] if done else self.current["init_mse"])
                    self.current["best"] = self.best.info()
                phase.enter(block)
            groups = phase.param_groups(block)
            if groups and begin < phase.iterations:
                engine = self._engine(block, phase, groups)
                if begin:
                    self.checkpoint.load_engine(engine)
                try:
                    summary = self._train_phase(engine, k, p, begin)
                finally:
                    release_engine(engine)
                    del engine
                    gc.collect()  # the engine's reference cycles; device memory does not prompt Python's GC
            else:
                summary = {"phase": phase.name, "iterations": 0, "first_loss": None, "final_loss": None,
                           "seconds": 0.0, "samples_per_s": None}
            phase.leave(block)
            self.current["phases"].append({**summary, **self._keep_best(k, p)})
            if p + 1 < len(self.phases):
                self.save_checkpoint(DistillState(k, 0, p + 1))
        phases = self.current["phases"]
        final_mse, best_mse = phases[-1]["final_mse"], phases[-1]["best_mse"]
        t0 = time.time()
        self.block_inputs.end(k)
        cache_seconds += time.time() - t0
        seconds = sum(ph["seconds"] for ph in phases)
        summary = {"block": name, "first_loss": phases[0]["first_loss"], "final_loss": phases[-1]["final_loss"],
                   "iterations": sum(ph["iterations"] for ph in phases), "seconds": round(seconds, 3),
                   "cache_seconds": round(cache_seconds, 3), "cached": cached,
                   "capture_forwards_per_row": round(self.block_inputs.forwards / self.offsets[-1], 3),
                   "samples_per_s": round(sum(ph["iterations"] for ph in phases) * self.cfg.batch_size / seconds, 1)
                   if seconds > 0 else None,
                   "init_mse": self.current["init_mse"], "final_mse": final_mse, "best_mse": best_mse,
                   "reverted": [f"{ph['phase']}: kept {ph['kept']}" for ph in phases if ph["kept"] != "end"],
                   "phases": phases}
        self.summaries.append(summary)
        if self.writer is not None:
            log_block(self.writer, block, name, k, summary)
        kept = f"; kept {best_mse:.3e} ({', '.join(summary['reverted'])})" if summary["reverted"] else ""
        self._log(f"block {k + 1}/{len(self.blocks_q)} {name}: block-output MSE {summary['init_mse']:.3e} -> "
                  f"{final_mse:.3e}{kept}")

    def _keep_best(self, k: int, p: int) -> dict:
        """At the end of phase p of block k: its held-out MSE at the start, where training ended and what the block
        keeps (the state where training ended, or the best one it reached when that was better)."""
        final = self.evaluate(k)
        if self.best is None:  # keep_best off
            return {"final_mse": final, "best_mse": final, "kept": "end"}
        best, self.best = self.best, None
        self.current.pop("best", None)
        if final <= best.mse:  # training's end is (at least as good as) the best: kept as it is
            best.mse, best.where = final, "end"
        else:
            best.restore(self.blocks_q[k].module)
            self._log(f"block {k + 1}/{len(self.blocks_q)} {self.blocks_q[k].name}, phase {self.phases[p].name}: "
                      f"training ended at held-out MSE {final:.3e}, worse than at {best.where} ({best.mse:.3e}); "
                      f"reverted to that state")
        return {"start_mse": best.start, "final_mse": final, "best_mse": best.mse, "kept": best.where}

    def _train_phase(self, engine, k: int, p: int, start: int) -> dict:
        name, block, phase = self.blocks_q[k].name, self.blocks_q[k].module, self.phases[p]
        tag = name if len(self.phases) == 1 else f"{name}/{phase.name}"
        offset, per_block = self.phase_offsets[p], self.phase_offsets[-1]

        def batch(it: int) -> dict:
            data = self._batch(self._rows(k, offset + it))
            set_timesteps(block, data["t"])
            return data

        return self.train_loop(engine, phase, block, start, batch, tag, f"block {k + 1}/{len(self.blocks_q)} {tag}",
                               k * per_block + offset, lambda: self.evaluate(k),
                               lambda it: self.save_checkpoint(DistillState(k, it, p), engine),
                               ", inputs cached" if self.block_inputs.cached else "")

    def train_loop(self, engine, phase: Phase, module: nn.Module, start: int, batch, tag: str, label: str,
                   first_step: int, evaluate, save, note: str = "") -> dict:
        """Iterations `start`, ... of `phase` on `module` (wrapped by `engine`): `batch(it)` gives the iteration's
        {"args", "kwargs", "target", "t"}; `evaluate()` the held-out MSE (keep_best offers the state to
        self.best); `save(it)` checkpoints after `it` iterations. TensorBoard under loss/`tag`, steps from
        `first_step`; `label` names the work in logs and errors."""
        cfg = self.cfg
        bar = progress(range(start, phase.iterations), label, disable=self.rank != 0, logger=logger)
        params = [q for q in module.parameters() if q.requires_grad]
        t0, first_loss, loss_value, samples, updated = time.time(), None, None, 0, None
        for it in bar:
            data = batch(it)
            with autocast(self.device, self.precision):
                out = engine(*data["args"], **data["kwargs"])
            per_sample, loss = phase.loss(module, out, data["target"], it)  # in fp32 (phases.py)
            loss_avg = self._mean_over_ranks(per_sample.mean())
            # The iteration's one host sync: the loss over all ranks, this rank's, and whether the last update left
            # the parameters finite. A non-finite loss stops before its update, so the parameters stay good.
            loss_value, local, finite = torch.stack([loss_avg.float(), loss.detach().float(),
                                                     updated if updated is not None else loss_avg.new_ones(())]).tolist()
            self._check_update(finite, label, it - 1)
            if not (math.isfinite(loss_value) and math.isfinite(local)):
                raise DivergenceError(f"{label}, iteration {it}: loss is {loss_value} (non-finite); stopped "
                                      f"before the update; the last good checkpoint is kept in {self.out / CHECKPOINT}")
            engine.backward(loss)
            engine.step()
            updated = torch.stack([q.isfinite().all() for q in params]).all().float()  # read at the next sync
            first_loss = loss_value if first_loss is None else first_loss
            samples += cfg.batch_size
            if self.writer is not None and (it % cfg.log_every == 0 or it == phase.iterations - 1):
                log_scalars(self.writer, engine, tag, first_step + it + 1, loss_value, per_sample,
                            data["t"], samples / (time.time() - t0),
                            {f"{phase.name}/{key}": v for key, v in phase.scalars(module, it).items()})
            bar.set_postfix(loss=f"{loss_value:.3e}")
            if self.best is not None and phase.keeps_best_inside and cfg.eval_every \
                    and (it + 1) % cfg.eval_every == 0 and it + 1 < phase.iterations:
                self._check_update(updated.item(), label, it)  # a non-finite state is never kept
                self.best.offer(module, evaluate(), f"iteration {it + 1}")
                self.current["best"] = self.best.info()
            if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < phase.iterations:
                self._check_update(updated.item(), label, it)  # nothing non-finite is checkpointed
                save(it + 1)
        if updated is not None:
            self._check_update(updated.item(), label, phase.iterations - 1)
        bar.close()
        seconds = time.time() - t0
        summary = {"phase": phase.name, "first_loss": first_loss,
                   "final_loss": loss_value,
                   "iterations": phase.iterations - start, "seconds": round(seconds, 3),
                   "samples_per_s": round(samples / seconds, 1) if seconds > 0 else None}
        if first_loss is not None:
            self._log(f"{label}: loss {first_loss:.3e} -> {summary['final_loss']:.3e} "
                      f"({summary['iterations']} it, {seconds:.1f}s, {summary['samples_per_s']} samples/s{note})")
        return summary

    def _check_update(self, finite: float, label: str, it: int) -> None:
        if not finite:
            raise DivergenceError(f"{label}, iteration {it}: the update made parameters non-finite; stopped; "
                                  f"the last good checkpoint is kept in {self.out / CHECKPOINT}")

    def _log(self, message: str) -> None:
        if self.rank == 0:
            logger.info(message)
