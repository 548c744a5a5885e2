"""Block-wise training of a quantized model on DeepSpeed (DESIGN.md §3.5, §3.6, §4).

For each block k, in execution order, the quantized block learns to match its FP twin, e.g. (DilateQuant BKD)

    L = MSE( B̂_k(input from the quantized chain), B_k(input from the FP chain) )

What learns and against which loss is the recipe's: a list of phases that every block goes through in order
(trainer/phases.py: DilateQuant's one BKD phase; trainer/qdiffusion.py: AdaRound, then activation step sizes).
Block inputs and targets come from hooks on the live models (a forward pre-hook captures the block's call
and stops the forward). They are computed once per block for all of this rank's calibration rows when they
fit in `cache_mb`, otherwise recomputed for every batch. One DeepSpeed engine per phase of a block, with the
phase's parameter groups and learning rates. Before its first phase and after its last, every block's output
MSE is measured on one fixed batch (`init_mse`, `final_mse` in the summaries).

Data parallel over calibration shards: every iteration takes `batch_size / num_shards` rows from every
shard, drawn by a pure function of (seed, block, iteration, shard), so the global batch is the same
whatever the number of ranks, a resumed run draws what an uninterrupted one would, and each rank reads
only its own shards. Every batch mixes timesteps; each sample uses its own timestep's quantizer row.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from tqdm import tqdm

from ..data.calibration_set import to_model_inputs
from ..quantizers import Block, TemporalQuantizer, UniformQuantizer, block_output, set_timesteps
from .checkpoint import CheckpointError
from .phases import DistillPhase, Phase, parameter_groups, per_sample_mse  # noqa: F401 (re-exported)

CHECKPOINT = "checkpoint"
STUDENT = "student.safetensors"
PROGRESS = "progress.json"
ENGINE = "engine"
TIMESTEP_BUCKETS = 4  # loss is also logged per quarter of the 0..1000 timestep range
EVAL_ITERATION = -1  # the rows of a block's fixed evaluation batch: drawn like an iteration no phase runs
LR_TAGS = {"weights": "lr/weights", "step_size": "lr/quantizers", "rounding": "lr/rounding"}  # group name prefix


class DivergenceError(RuntimeError):
    """A non-finite loss: training of the block stopped; the last good checkpoint is kept."""


class _Stop(Exception):
    """Raised by a hook to end a forward once the block of interest has been seen."""


@torch.no_grad()
def capture_block_call(model: nn.Module, block: nn.Module, model_kwargs: dict, with_output: bool) -> dict:
    """Run `model(**model_kwargs)` until `block` is called; return its args, kwargs and, if asked, its
    output. The rest of the forward is skipped."""
    seen: dict = {}

    def pre(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        if not with_output:
            raise _Stop

    def post(module, args, kwargs, output):
        seen["output"] = block_output(output)
        raise _Stop

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True)]
    if with_output:
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        model(**model_kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "args" not in seen:
        raise RuntimeError(f"block {type(block).__name__} was not called by the model's forward")
    # diffusers' attention returns channels_last views; GroupNorm's CPU backward on a channels_last input
    # crashes (segfault, torch 2.13), and the block is trained from these tensors: store them contiguous.
    leaves, spec = tree_flatten((seen["args"], seen["kwargs"]))
    seen["args"], seen["kwargs"] = tree_unflatten(
        [x.contiguous() if isinstance(x, torch.Tensor) else x for x in leaves], spec)
    return seen


def shard_rows(seed: int, block_index: int, iteration: int, shard_index: int, shard_len: int, per_shard: int):
    """Rows of one shard for one iteration: a pure function of its arguments."""
    key = ((seed * 1_000_003 + block_index) * 1_000_003 + iteration) * 1_000_003 + shard_index
    g = torch.Generator().manual_seed(key % (2**63))
    return torch.randperm(shard_len, generator=g)[:per_shard]


@dataclass
class DistillState:
    block_index: int = 0  # the block being trained (== number of finished blocks)
    iteration: int = 0  # iterations finished inside its current phase
    phase: int = 0  # index of that phase in the recipe's phases


class RowCache:
    """One block's captured calls for all of this rank's rows. Tensors whose batch dimension is the model
    batch (rows × `fold`, the fold being 2 for guidance batches) are stored as [fold, rows, ...] so any
    selection of rows can be reassembled; everything else is kept from the first chunk."""

    def __init__(self, chunks: list[dict], rows_per_chunk: list[int]):
        spec = None
        columns: list[list] = []
        self.batched: list[bool] = []
        for chunk, rows in zip(chunks, rows_per_chunk):
            leaves, spec = tree_flatten(chunk)
            fold = chunk["t"].shape[0] // rows
            if not columns:
                columns = [[] for _ in leaves]
                self.batched = [isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows * fold
                                for x in leaves]
                self.fold = fold
            for col, leaf, batched in zip(columns, leaves, self.batched):
                col.append(leaf.unflatten(0, (fold, rows)) if batched else leaf)
        self.spec = spec
        self.leaves = [torch.cat(col, dim=1) if batched else col[0] for col, batched in zip(columns, self.batched)]

    def select(self, rows: torch.Tensor) -> dict:
        leaves = [x[:, rows].flatten(0, 1) if batched else x for x, batched in zip(self.leaves, self.batched)]
        return tree_unflatten(leaves, self.spec)

    @staticmethod
    def nbytes(chunk: dict) -> int:
        return sum(x.numel() * x.element_size() for x in tree_flatten(chunk)[0] if isinstance(x, torch.Tensor))


class BlockDistiller:
    """Train `student` (quantize_'d and calibrated) towards `teacher`, block by block, phase by phase.

    `shards` are this rank's calibration shards (torch-formatted datasets) with their global indices
    `shard_ids`; `num_shards` is the total over all ranks. `cfg` is a DistillConfig; `ds_config` the
    DeepSpeed config dict (batch sizes are filled in here); `phases` the recipe's (default: DilateQuant's
    one BKD phase from `cfg`).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, blocks_fp: list[Block], blocks_q: list[Block],
                 shards: list, shard_ids: list[int], num_shards: int, cfg, ds_config: dict, out: str | Path,
                 rank: int = 0, world_size: int = 1, writer=None, run_config: dict | None = None,
                 phases: list[Phase] | None = None):
        if [b.name for b in blocks_fp] != [b.name for b in blocks_q]:
            raise ValueError("teacher and student blocks differ: " f"{[b.name for b in blocks_fp]} vs {[b.name for b in blocks_q]}")
        self.teacher, self.student = teacher, student
        self.blocks_fp, self.blocks_q = blocks_fp, blocks_q
        self.shards, self.shard_ids, self.num_shards = shards, shard_ids, num_shards
        self.cfg, self.out = cfg, Path(out)
        self.rank, self.world_size, self.writer = rank, world_size, writer
        self.run_config = run_config or {}
        self.phases = phases if phases is not None else [DistillPhase(cfg)]
        # where each phase's iterations start inside a block: its batches and TensorBoard steps
        self.phase_offsets = [sum(ph.iterations for ph in self.phases[:i]) for i in range(len(self.phases) + 1)]
        if num_shards % world_size:
            raise ValueError(f"the calibration set has {num_shards} shards, not a multiple of the {world_size} ranks: "
                             "every rank must hold the same number of shards (record it with a matching batch_size)")
        if cfg.batch_size % num_shards:
            raise ValueError(f"distill.batch_size ({cfg.batch_size}) must be a multiple of the number of calibration "
                             f"shards ({num_shards}): every iteration takes the same number of rows from each")
        self.per_shard = cfg.batch_size // num_shards
        short = [sid for s, sid in zip(shards, shard_ids) if len(s) < self.per_shard]
        if short:
            raise ValueError(f"shard {short[0]} has fewer rows than the {self.per_shard} an iteration takes from it")
        self.offsets = [0]
        for s in shards:
            self.offsets.append(self.offsets[-1] + len(s))
        self.ds_config = dict(ds_config)
        self.ds_config.update(train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
                              train_micro_batch_size_per_gpu=cfg.batch_size // world_size)
        self.summaries: list[dict] = []
        self.current: dict = {}  # the block in progress: its initial MSE and finished phases (checkpointed)
        self.device = next(student.parameters()).device

    # -- data ---------------------------------------------------------------------------------------
    def _rows(self, block_index: int, iteration: int) -> list[torch.Tensor]:
        return [shard_rows(self.cfg.seed, block_index, iteration, sid, len(shard), self.per_shard)
                for shard, sid in zip(self.shards, self.shard_ids)]

    def _model_inputs(self, parts: list[dict]) -> dict:
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return {k: v.to(self.device) for k, v in to_model_inputs(batch).items()}

    def _capture(self, k: int, model_kwargs: dict) -> dict:
        """The call of block k for one batch: the student's inputs, the teacher's output, the timesteps."""
        fp = capture_block_call(self.teacher, self.blocks_fp[k].module, model_kwargs, with_output=True)
        q = fp if self.cfg.block_input == "fp" else \
            capture_block_call(self.student, self.blocks_q[k].module, model_kwargs, with_output=False)
        t = torch.as_tensor(model_kwargs["timestep"]).reshape(-1).float()
        return {"args": q["args"], "kwargs": q["kwargs"], "target": fp["output"], "t": t}

    def capture_rows(self, k: int) -> RowCache | None:
        """All of this rank's rows for block k, if they fit in cfg.cache_mb."""
        if self.cfg.cache_mb <= 0:
            return None
        chunks, sizes, total_rows = [], [], self.offsets[-1]
        for shard in self.shards:
            for a in range(0, len(shard), self.cfg.batch_size):
                rows = shard[a:a + self.cfg.batch_size]
                n = len(rows["timestep"])
                chunk = self._capture(k, self._model_inputs([rows]))
                if not chunks and RowCache.nbytes(chunk) / n * total_rows > self.cfg.cache_mb * 2**20:
                    return None  # recompute per batch instead
                chunks.append(chunk)
                sizes.append(n)
        return RowCache(chunks, sizes)

    def _batch(self, k: int, iteration: int, cache: RowCache | None) -> dict:
        rows = self._rows(k, iteration)
        if cache is not None:
            return cache.select(torch.cat([r + off for r, off in zip(rows, self.offsets)]))
        return self._capture(k, self._model_inputs([s[r.tolist()] for s, r in zip(self.shards, rows)]))

    # -- checkpoints --------------------------------------------------------------------------------
    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def save_checkpoint(self, state: DistillState, engine=None) -> None:
        """All ranks write into a temporary folder (the student's full state and progress by rank 0; the live
        engine with its optimizer partitions and each rank's RNG state by every rank); rank 0 renames it
        into place once every rank has written, so a crash mid-write keeps the previous checkpoint. Inside a
        phase the student's state holds what the phase added to it (AdaRound's α)."""
        tmp = self.out / f".{CHECKPOINT}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        if engine is not None:
            engine.save_checkpoint(str(tmp / ENGINE), tag="live")
        torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            state_dict = {k: v.detach().contiguous().cpu() for k, v in self.student.state_dict().items()}
            save_file(state_dict, str(tmp / STUDENT))
            phase = self.phases[state.phase].name if state.phase < len(self.phases) else None
            (tmp / PROGRESS).write_text(json.dumps({
                "block_index": state.block_index, "phase": state.phase, "phase_name": phase,
                "iteration": state.iteration, "world_size": self.world_size,
                "blocks": [b.name for b in self.blocks_q], "summaries": self.summaries,
                "current_block": self.current,
                "run_config": self.run_config}, indent=2))
        self._barrier()
        if self.rank == 0:
            final, old = self.out / CHECKPOINT, self.out / f".{CHECKPOINT}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def load_checkpoint(self) -> DistillState:
        """The state to start from: a fresh one, or the run folder's checkpoint (student state loaded; a block
        stopped inside a phase has that phase entered again first, so the state it added loads too)."""
        ckpt, old = self.out / CHECKPOINT, self.out / f".{CHECKPOINT}.old"
        if self.rank == 0 and not ckpt.exists() and old.exists():
            os.replace(old, ckpt)  # a crash between save_checkpoint's two renames: the previous one is complete
        self._barrier()
        if not ckpt.exists():
            return DistillState()
        try:
            progress = json.loads((ckpt / PROGRESS).read_text())
            state = DistillState(int(progress["block_index"]), int(progress["iteration"]),
                                 int(progress.get("phase", 0)))  # checkpoints before phases: 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint file {ckpt / PROGRESS} is missing or corrupted: {e}") from None
        if progress.get("blocks") != [b.name for b in self.blocks_q]:
            raise CheckpointError(f"{ckpt / PROGRESS} was written for other blocks (another model?); "
                                  "start a new run folder or pass overwrite=true")
        saved = progress.get("run_config") or {}
        for key in ("recipe", "quant"):  # resuming under other bits or another recipe would mix two runs
            if key in saved and key in self.run_config and saved[key] != self.run_config[key]:
                there, here = saved[key], self.run_config[key]
                diff = [f"{key}.{k}: {there.get(k)} there, {here.get(k)} here" for k in sorted({*there, *here})
                        if there.get(k) != here.get(k)] if isinstance(there, dict) and isinstance(here, dict) \
                    else [f"{key}: {there} there, {here} here"]
                raise CheckpointError(f"{ckpt} was written by another run ({'; '.join(diff)}); start a new run "
                                      "folder or pass overwrite=true")
        names = [ph.name for ph in self.phases]
        if state.phase >= len(names) or progress.get("phase_name", names[0]) != names[state.phase]:
            raise CheckpointError(f"{ckpt / PROGRESS} stopped in phase {progress.get('phase_name')!r}, which this "
                                  f"recipe does not have at that place ({names}); start a new run folder")
        if state.iteration and progress.get("world_size") != self.world_size:
            raise CheckpointError(f"{ckpt} was written mid-block by {progress.get('world_size')} rank(s); resume it "
                                  f"with that many (ZeRO optimizer partitions are per rank), not {self.world_size}")
        if state.iteration:
            self.phases[state.phase].enter(self.blocks_q[state.block_index].module)
        try:
            tensors = load_file(str(ckpt / STUDENT))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {ckpt / STUDENT} is corrupted or truncated: {e}") from None
        try:
            self.student.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt / STUDENT} does not fit this model: {str(e).splitlines()[0]}") from None
        rng = ckpt / f"rng-rank{self.rank}.pt"
        if rng.exists():
            try:
                torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
            except Exception as e:  # torch raises several types for damaged pickles
                raise CheckpointError(f"checkpoint file {rng} is corrupted: {e}") from None
        self.summaries = progress.get("summaries", [])
        self.current = progress.get("current_block") or {}
        return state

    def _load_engine(self, engine) -> None:
        path = self.out / CHECKPOINT / ENGINE
        try:
            loaded, _ = engine.load_checkpoint(str(path), tag="live")
        except Exception as e:  # DeepSpeed surfaces unpickling / shape errors of many kinds
            raise CheckpointError(f"engine checkpoint under {path} cannot be loaded: {type(e).__name__}: {e}") from None
        if loaded is None:
            raise CheckpointError(f"engine checkpoint under {path} is missing")

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
        for k in range(state.block_index, len(self.blocks_q)):
            resumed = k == state.block_index
            self._train_block(k, state.phase if resumed else 0, state.iteration if resumed else 0)
            self.current = {}
            self.save_checkpoint(DistillState(k + 1, 0))
        return self.summaries

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(x)
            x /= self.world_size
        return x

    @torch.no_grad()
    def evaluate(self, k: int, cache: RowCache | None) -> float:
        """Block k's output MSE against the FP block on one fixed batch, as it is now."""
        block = self.blocks_q[k].module
        data = self._batch(k, EVAL_ITERATION, cache)
        set_timesteps(block, data["t"])
        mse = per_sample_mse(block(*data["args"], **data["kwargs"]), data["target"]).mean()
        return self._mean_over_ranks(mse).item()

    def _train_block(self, k: int, first_phase: int, start: int) -> None:
        """Phases `first_phase`, ... of block k, the first one from iteration `start` (a resumed checkpoint's)."""
        name, block = self.blocks_q[k].name, self.blocks_q[k].module
        t0 = time.time()
        cache = self.capture_rows(k)
        cache_seconds = time.time() - t0
        if not self.current:
            self.current = {"init_mse": self.evaluate(k, cache), "phases": []}
        for p in range(first_phase, len(self.phases)):
            phase, begin = self.phases[p], start if p == first_phase else 0
            if not begin:  # a resumed phase was entered before its checkpoint was loaded
                phase.enter(block)
            groups = phase.param_groups(block)
            if groups and begin < phase.iterations:
                engine = self._engine(block, phase, groups)
                if begin:
                    self._load_engine(engine)
                self.current["phases"].append(self._train_phase(engine, k, p, begin, cache))
                del engine
            else:
                self.current["phases"].append({"phase": phase.name, "iterations": 0, "first_loss": None,
                                               "final_loss": None, "seconds": 0.0, "samples_per_s": None})
            phase.leave(block)
            if p + 1 < len(self.phases):
                self.save_checkpoint(DistillState(k, 0, p + 1))
        phases = self.current["phases"]
        seconds = sum(ph["seconds"] for ph in phases)
        summary = {"block": name, "first_loss": phases[0]["first_loss"], "final_loss": phases[-1]["final_loss"],
                   "iterations": sum(ph["iterations"] for ph in phases), "seconds": round(seconds, 3),
                   "cache_seconds": round(cache_seconds, 3), "cached": cache is not None,
                   "samples_per_s": round(sum(ph["iterations"] for ph in phases) * self.cfg.batch_size / seconds, 1)
                   if seconds > 0 else None,
                   "init_mse": self.current["init_mse"], "final_mse": self.evaluate(k, cache), "phases": phases}
        self.summaries.append(summary)
        if self.writer is not None:
            self._log_histograms(block, name, k)
            self.writer.add_scalar("block_mse/init", summary["init_mse"], k)  # a curve over the blocks
            self.writer.add_scalar("block_mse/final", summary["final_mse"], k)
        self._log(f"block {k + 1}/{len(self.blocks_q)} {name}: block-output MSE {summary['init_mse']:.3e} -> "
                  f"{summary['final_mse']:.3e}")

    def _train_phase(self, engine, k: int, p: int, start: int, cache: RowCache | None) -> dict:
        cfg, name, block, phase = self.cfg, self.blocks_q[k].name, self.blocks_q[k].module, self.phases[p]
        tag = name if len(self.phases) == 1 else f"{name}/{phase.name}"
        offset, per_block = self.phase_offsets[p], self.phase_offsets[-1]
        bar = tqdm(range(start, phase.iterations), desc=f"block {k + 1}/{len(self.blocks_q)} {tag}",
                   disable=self.rank != 0, dynamic_ncols=True, leave=False, mininterval=2.0)
        t0, first_loss, loss_avg, samples = time.time(), None, None, 0
        for it in bar:
            data = self._batch(k, offset + it, cache)
            set_timesteps(block, data["t"])
            per_sample, loss, scalars = phase.loss(block, engine(*data["args"], **data["kwargs"]), data["target"], it)
            loss_avg = self._mean_over_ranks(per_sample.mean())
            if not torch.isfinite(loss_avg) or not torch.isfinite(loss):  # before the step: parameters stay good
                raise DivergenceError(f"block {name}, iteration {it}: loss is {loss_avg.item()} (non-finite); stopped "
                                      f"before the update; the last good checkpoint is kept in {self.out / CHECKPOINT}")
            engine.backward(loss)
            engine.step()
            if not all(torch.isfinite(p).all() for p in block.parameters()):
                raise DivergenceError(f"block {name}, iteration {it}: the update made parameters non-finite; stopped; "
                                      f"the last good checkpoint is kept in {self.out / CHECKPOINT}")
            first_loss = loss_avg.item() if first_loss is None else first_loss
            samples += cfg.batch_size
            if self.writer is not None and (it % cfg.log_every == 0 or it == phase.iterations - 1):
                self._log_scalars(engine, tag, k * per_block + offset + it + 1, loss_avg.item(), per_sample,
                                  data["t"], samples / (time.time() - t0), {f"{phase.name}/{key}": v
                                                                            for key, v in scalars.items()})
            bar.set_postfix(loss=f"{loss_avg.item():.3e}")
            if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < phase.iterations:
                self.save_checkpoint(DistillState(k, it + 1, p), engine)
        bar.close()
        seconds = time.time() - t0
        summary = {"phase": phase.name, "first_loss": first_loss,
                   "final_loss": loss_avg.item() if loss_avg is not None else None,
                   "iterations": phase.iterations - start, "seconds": round(seconds, 3),
                   "samples_per_s": round(samples / seconds, 1) if seconds > 0 else None}
        if first_loss is not None:
            self._log(f"block {k + 1}/{len(self.blocks_q)} {tag}: loss {first_loss:.3e} -> {summary['final_loss']:.3e} "
                      f"({summary['iterations']} it, {seconds:.1f}s, {summary['samples_per_s']} samples/s"
                      f"{', inputs cached' if cache is not None else ''})")
        return summary

    # -- logging ------------------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[distill] {message}", flush=True)

    def _log_scalars(self, engine, name, step, loss, per_sample, t, samples_per_s, extra: dict) -> None:
        w = self.writer
        w.add_scalar(f"loss/{name}", loss, step)
        w.add_scalar("loss/all_blocks", loss, step)
        width = 1000 // TIMESTEP_BUCKETS
        per_sample = per_sample.detach().cpu()
        buckets = (t.detach().cpu().clamp(0, 999) // width).long()
        for b in buckets.unique().tolist():
            w.add_scalar(f"loss_by_timestep/{b * width:03d}-{(b + 1) * width - 1:03d}",
                         per_sample[buckets == b].mean().item(), step)
        groups = engine.optimizer.param_groups
        for prefix, tag in LR_TAGS.items():
            group = next((g for g in groups if g.get("name", "").startswith(prefix)), None)
            if group is not None:  # step sizes: the rate relative to their scale, as configured
                w.add_scalar(tag, group["lr"] / group.get("scale", 1.0), step)
        for tag, value in extra.items():
            w.add_scalar(tag, value, step)
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            w.add_scalar("grad_norm", float(grad_norm), step)
        w.add_scalar("samples_per_s", samples_per_s, step)
        w.add_scalar("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step)
        if torch.cuda.is_available():
            w.add_scalar("peak_gpu_mb", torch.cuda.max_memory_allocated() / 2**20, step)

    def _log_histograms(self, block: nn.Module, name: str, k: int) -> None:
        for mname, m in block.named_modules():
            if isinstance(m, (UniformQuantizer, TemporalQuantizer)):
                self.writer.add_histogram(f"step_size/{name}.{mname}", m.delta.detach().abs().cpu(), k)
