"""The student that block-wise distillation starts from: a quantize_'d copy of the FP model with Weight
Dilation and every temporal-parallel-quantizer row initialised from its own timestep's activations."""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch

from ..data.calibration_set import to_model_inputs
from ..devices import autocast, cast_inputs
from ..distributed_env import from_rank0
from ..files import atomic_write_text
from ..quantizers import TemporalQuantizer, calibrate_, find_blocks, quantize_
from ..quantizers.layer_precision import select_sensitive_layers, selection_summary

logger = logging.getLogger(__name__)


def init_batches(shards, rows: int, batch_size: int, device, dtype=torch.float32, model=None):
    """About `rows` rows taken evenly from every shard (so all timesteps), as batches of `model`'s inputs (a UNet's
    when None) on `device` (floating inputs in `dtype`)."""
    per_shard = max(1, rows // len(shards))
    for shard in shards:
        idx = torch.linspace(0, len(shard) - 1, min(per_shard, len(shard))).round().long().tolist()
        for a in range(0, len(idx), batch_size):
            yield cast_inputs(to_model_inputs(shard[idx[a:a + batch_size]], model), device, dtype)


def resolve_keep_sensitive(fp, quant, all_shards, device, init_rows: int, batch_size: int, num_train_timesteps: int,
                           record: Path, reuse: bool, rank: int = 0, world_size: int = 1, seed: int = 0):
    """`quant` with `keep_sensitive=auto` resolved into `layer_bits` (quantizers/layer_precision.py), chosen on
    rank 0 from calibration rows and written to `record` (JSON, with the sensitivity it was chosen from); with
    `reuse` (a resumed run) an existing record is read instead, so the run goes on with the layers it started
    with. Any other `quant` is returned as it is."""
    if quant.keep_sensitive != "auto":
        return quant

    def choose():
        if reuse and record.exists():
            return json.loads(record.read_text())["layer_bits"]
        torch.manual_seed(seed)  # RTN's activation-range subsample
        dtype = next(fp.parameters()).dtype
        resolved, report = select_sensitive_layers(
            fp, quant, init_batches(all_shards, init_rows, batch_size, device, dtype, fp),
            init_batches(all_shards, quant.keep_sensitive_rows, batch_size, device, dtype, fp), num_train_timesteps)
        logger.info(selection_summary(report))
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps({"layer_bits": resolved.layer_bits, **report}, indent=2))
        return resolved.layer_bits

    return dataclasses.replace(quant, layer_bits=from_rank0(choose, rank, world_size), keep_sensitive="off")


def build_student(fp, cfg, all_shards, device, calibrate: bool = True, rank: int = 0, world_size: int = 1):
    """(student, blocks of fp, blocks of student) for a TrainConfig `cfg`. The TPQ init subsamples
    activations under torch's global RNG, seeded here; it runs on rank 0 only, whose tables every other rank
    then receives, so all ranks train the same student. With calibrate=False the tables are left for a
    checkpoint to fill."""
    torch.manual_seed(cfg.distill.seed)
    student = quantize_(copy.deepcopy(fp), cfg.quant)
    dtype = next(fp.parameters()).dtype
    example = next(init_batches(all_shards[:1], 2, 2, device, dtype, fp))
    blocks_fp, blocks_q = find_blocks(fp, example), find_blocks(student, example)
    if calibrate:
        if rank == 0:  # the tables see the activations of the precision the run trains in
            with autocast(device, cfg.precision):
                calibrate_(student, init_batches(all_shards, cfg.distill.init_rows, cfg.distill.batch_size, device,
                                                 dtype, fp))
        if world_size > 1:
            share_activation_tables(student, rank)
    return student, blocks_fp, blocks_q


def share_activation_tables(model, rank: int, src: int = 0) -> None:
    """Every TemporalQuantizer table of rank `src` loaded into this rank's model (a collective: all ranks call
    it). The tables are small (a few rows per quantizer); they travel as one pickled object."""
    tables = [m for m in model.modules() if isinstance(m, TemporalQuantizer)]
    box = [[{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in tables] if rank == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    for m, state in zip(tables, box[0], strict=True):
        m.load_state_dict(state)
