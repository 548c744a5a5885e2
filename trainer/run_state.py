"""The run's checkpoint: where block-wise training stands, and the state needed to continue from there.

    OUT/checkpoint/progress.json          block, phase and iteration reached; blocks, summaries, run config; and
                                          `student_files`, the manifest of the student's state files below
    OUT/checkpoint/student.safetensors    the whole student, as of the run's first checkpoint
    OUT/checkpoint/block-NNN.safetensors  block NNN's state when it finished
    OUT/checkpoint/current.safetensors    inside a block: that block's state (with what its phase added, e.g. α)
    OUT/checkpoint/best.safetensors       inside a phase: the block's best state so far (trainer/best_state.py)
    OUT/checkpoint/engine/                the live DeepSpeed engine (optimizer partitions), inside a block only
    OUT/checkpoint/rng-rankR.pt           each rank's torch RNG state

The student's state is the manifest's files applied in order, each replacing everything under its block's
prefix: training block k changes only block k, so a checkpoint writes that block, not the whole student (3.4 GB
for SD-1.5). Written after every block and every `checkpoint_every` iterations: all ranks write into
OUT/.checkpoint.tmp, the unchanged state files are hard-linked in from the previous checkpoint, then rank 0
swaps it into place (files.replace_dir), so a crash mid-write keeps the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import recover_dir, replace_dir

CHECKPOINT = "checkpoint"
STUDENT = "student.safetensors"
CURRENT = "current.safetensors"
BEST = "best.safetensors"
PROGRESS = "progress.json"
ENGINE = "engine"


@dataclass
class DistillState:
    block_index: int = 0  # the block being trained (== number of finished blocks)
    iteration: int = 0  # iterations finished inside its current phase
    phase: int = 0  # index of that phase in the recipe's phases


def loss_scaler(engine):
    """The GradScaler of an engine with DeepSpeed's fp16 `torch_autocast` section (ZeRO 0 keeps it on the engine,
    ZeRO 1/2 on the optimizer), or None."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None) or \
        getattr(engine.optimizer, "torch_autocast_gradscaler", None)


class RunCheckpoint:
    """OUT/checkpoint for one rank of `world_size`."""

    def __init__(self, out: str | Path, rank: int = 0, world_size: int = 1):
        self.out, self.rank, self.world_size = Path(out), rank, world_size
        self.path = self.out / CHECKPOINT
        self.student_files: list[dict] = []  # the manifest of the checkpoint on disk (rank 0's)

    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def save(self, student, progress: dict, engine=None, block: tuple[int, str, bool] | None = None,
             best: dict[str, torch.Tensor] | None = None) -> None:
        """Every rank calls this: rank 0 writes the student and `progress`, every rank its RNG state and its
        part of the live `engine` (when given). `block` = (index, module name, finished): the only block whose
        state changed since the last checkpoint; None writes the whole student. `best`: the block's best state
        inside a phase."""
        tmp = self.out / f".{CHECKPOINT}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        if engine is not None:
            engine.save_checkpoint(str(tmp / ENGINE), tag="live")
            if (scaler := loss_scaler(engine)) is not None:  # not in DeepSpeed's checkpoint
                torch.save(scaler.state_dict(), tmp / f"loss-scaler-rank{self.rank}.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            files = self._write_student(student, tmp, block)
            if best is not None:
                save_file({k: v.contiguous().cpu() for k, v in best.items()}, str(tmp / BEST))
            (tmp / PROGRESS).write_text(json.dumps({**progress, "world_size": self.world_size,
                                                    "student_files": files}, indent=2))
        self._barrier()
        if self.rank == 0:
            replace_dir(tmp, self.path)
            self.student_files = files
        self._barrier()

    def _write_student(self, student, tmp: Path, block: tuple[int, str, bool] | None) -> list[dict]:
        """The student's state files in `tmp`: the changed block's, the others linked from the last checkpoint."""
        def write(name: str, prefix: str) -> dict:
            save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()
                       if k.startswith(prefix + "." if prefix else "")}, str(tmp / name))
            return {"file": name, "prefix": prefix}

        if block is None or not self.student_files:
            return [write(STUDENT, "")]
        index, prefix, finished = block
        kept = [f for f in self.student_files if f["file"] != CURRENT]
        for f in kept:
            try:
                os.link(self.path / f["file"], tmp / f["file"])
            except OSError:  # a filesystem without hard links
                shutil.copyfile(self.path / f["file"], tmp / f["file"])
        return kept + [write(f"block-{index:03d}.safetensors" if finished else CURRENT, prefix)]

    def read_progress(self) -> dict | None:
        """progress.json of the checkpoint, or None when the run has none (a crash between the swap's two
        renames is undone first)."""
        if self.rank == 0:
            recover_dir(self.path)
        self._barrier()
        if not self.path.exists():
            return None
        try:
            progress = json.loads((self.path / PROGRESS).read_text())
            progress["state"] = DistillState(int(progress["block_index"]), int(progress["iteration"]),
                                             int(progress.get("phase", 0)))  # checkpoints before phases: 0
            # checkpoints before per-block files: the whole student in one
            files = progress.get("student_files") or [{"file": STUDENT, "prefix": ""}]
            self.student_files = [{"file": str(f["file"]), "prefix": str(f["prefix"])} for f in files]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint file {self.path / PROGRESS} is missing or corrupted: {e}") from None
        return progress

    def check(self, progress: dict, blocks: list[str], phases: list[str], run_config: dict) -> None:
        """Refuse a checkpoint that another model, recipe, bit-width or rank count wrote."""
        state: DistillState = progress["state"]
        if progress.get("blocks") != blocks:
            raise CheckpointError(f"{self.path / PROGRESS} was written for other blocks (another model?); "
                                  "start a new run folder or pass overwrite=true")
        saved = progress.get("run_config") or {}
        for key in ("method", "quant"):  # resuming under other bits or another method would mix two runs
            if key in saved and key in run_config and saved[key] != run_config[key]:
                there, here = saved[key], run_config[key]
                diff = [f"{key}.{k}: {there.get(k)} there, {here.get(k)} here" for k in sorted({*there, *here})
                        if there.get(k) != here.get(k)] if isinstance(there, dict) and isinstance(here, dict) \
                    else [f"{key}: {there} there, {here} here"]
                raise CheckpointError(f"{self.path} was written by another run ({'; '.join(diff)}); start a new run "
                                      "folder or pass overwrite=true")
        if state.phase >= len(phases) or progress.get("phase_name", phases[0]) != phases[state.phase]:
            raise CheckpointError(f"{self.path / PROGRESS} stopped in phase {progress.get('phase_name')!r}, which "
                                  f"this recipe does not have at that place ({phases}); start a new run folder")
        e2e = progress.get("e2e") or {}
        inside_e2e = bool(e2e.get("iteration")) and not e2e.get("finished")
        if (state.iteration or inside_e2e) and progress.get("world_size") != self.world_size:
            where = "mid-block" if state.iteration else "inside the end-to-end phase"
            raise CheckpointError(f"{self.path} was written {where} by {progress.get('world_size')} rank(s); resume "
                                  f"it with that many (ZeRO optimizer partitions are per rank), not {self.world_size}")

    def load_student(self, student) -> None:
        """The state the manifest's files make, in order, each replacing its block's entries."""
        tensors = {}
        for f in self.student_files:
            path = self.path / f["file"]
            try:
                part = load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"checkpoint file {path} is corrupted or truncated: {e}") from None
            if f["prefix"]:
                tensors = {k: v for k, v in tensors.items() if not k.startswith(f["prefix"] + ".")}
            tensors.update(part)
        try:
            student.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            names = ", ".join(f["file"] for f in self.student_files)
            raise CheckpointError(f"the student's state in {self.path} ({names}) does not fit this model: "
                                  f"{str(e).splitlines()[0]}") from None

    def load_best(self, device=None) -> dict[str, torch.Tensor] | None:
        """The block's best state of a mid-phase checkpoint, or None when it has none."""
        path = self.path / BEST
        if not path.exists():
            return None
        try:
            return load_file(str(path), device=str(device or "cpu"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {path} is corrupted or truncated: {e}") from None

    def load_rng(self) -> None:
        rng = self.path / f"rng-rank{self.rank}.pt"
        if rng.exists():
            try:
                torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
            except Exception as e:  # torch raises several types for damaged pickles
                raise CheckpointError(f"checkpoint file {rng} is corrupted: {e}") from None

    def load_engine(self, engine) -> None:
        path = self.path / ENGINE
        try:
            loaded, _ = engine.load_checkpoint(str(path), tag="live")
        except Exception as e:  # DeepSpeed surfaces unpickling / shape errors of many kinds
            raise CheckpointError(f"engine checkpoint under {path} cannot be loaded: {type(e).__name__}: {e}") from None
        if loaded is None:
            raise CheckpointError(f"engine checkpoint under {path} is missing")
        scaler, saved = loss_scaler(engine), self.path / f"loss-scaler-rank{self.rank}.pt"
        if scaler is not None and saved.exists():
            try:
                scaler.load_state_dict(torch.load(saved, weights_only=True))
            except Exception as e:  # torch raises several types for damaged pickles
                raise CheckpointError(f"checkpoint file {saved} is corrupted: {e}") from None
