"""The student that block-wise distillation starts from: a quantize_'d copy of the FP model with Weight
Dilation and every temporal-parallel-quantizer row initialised from its own timestep's activations."""
from __future__ import annotations

import copy
import logging

import torch

from ..data.calibration_set import strided_batches
from ..devices import autocast
from ..quantizers import TemporalQuantizer, fit_ranges_, find_blocks, quantize_

logger = logging.getLogger(__name__)


def build_student(fp, cfg, all_shards, device, calibrate: bool = True, rank: int = 0, world_size: int = 1):
    """(student, blocks of fp, blocks of student) for a TrainConfig `cfg`. The TPQ init subsamples
    activations under torch's global RNG, seeded here; it runs on rank 0 only, whose tables every other rank
    then receives, so all ranks train the same student. With calibrate=False the tables are left for a
    checkpoint to fill."""
    torch.manual_seed(cfg.distill.seed)
    student = quantize_(copy.deepcopy(fp), cfg.quant)
    dtype = next(fp.parameters()).dtype
    example = next(strided_batches(all_shards[:1], 2, 2, device, dtype, fp))
    blocks_fp, blocks_q = find_blocks(fp, example), find_blocks(student, example)
    if calibrate:
        if rank == 0:  # the tables see the activations of the precision the run trains in
            with autocast(device, cfg.precision):
                fit_ranges_(student, strided_batches(all_shards, cfg.distill.init_rows, cfg.distill.batch_size, device,
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
