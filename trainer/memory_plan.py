"""What a `qdistill train` run will cost per rank, worked out on the meta device (no weights, no data):
the teacher and the student, the largest block's optimizer state by ZeRO stage, the block-input cache, the
largest block's activations at the per-rank batch, and forward-equivalents per calibration row. `scripts/plan.py`
prints it; BENCHMARKS.md holds its table for SD-1.5 and SDXL and its check against measured memory.

Everything is counted from the model itself: parameter and buffer bytes of the quantized structure, the block
graph and output layouts the trainer's own capture uses (trainer/block_graph.py), the tensors autograd saves
in one block's forward (a saved-tensors hook on meta tensors), and FLOPs from torch's FlopCounterMode.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..configs import load_config
from ..configs.schema import TrainConfig
from ..denoisers import example_inputs as inputs_of
from ..errors import ConfigError, QdistillError
from ..model_shapes import SHAPES
from ..quantizers import QUANT_LAYERS, TemporalQuantizer, find_blocks, quantize_, set_timesteps
from .block_graph import trace_block_graph
from .launch import load_deepspeed_config

TEXT_TOKENS = 77  # CLIP's sequence length: the encoder_hidden_states of SD-class models
MIB = 2**20


def meta_model(source: str) -> nn.Module:
    """A diffusers denoiser on the meta device from a model folder (its unet/ or transformer/config.json, or
    config.json), a config JSON file, or a name in qdistill.model_shapes.SHAPES."""
    if source in SHAPES:
        cls_name, config = SHAPES[source]
    else:
        path = Path(source)
        for candidate in (path / "unet" / "config.json", path / "transformer" / "config.json", path / "config.json",
                          path):
            if candidate.is_file():
                break
        else:
            raise ConfigError(f"--model {source}: not a model folder, a config.json or one of {sorted(SHAPES)}")
        try:
            config = json.loads(candidate.read_text())
        except ValueError as e:
            raise ConfigError(f"{candidate} is not valid JSON: {e}") from None
        cls_name = config.get("_class_name")
        if not isinstance(cls_name, str) or not hasattr(diffusers, cls_name):
            raise ConfigError(f"{candidate}: _class_name {cls_name!r} is not a diffusers model class")
    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in dict(config).items() if k != "quantization_config"}).eval()


def example_inputs(model: nn.Module, batch: int, device="meta") -> dict:
    """One batch of model inputs of the model's shapes (on the meta device: shapes only), CLIP-length text."""
    return inputs_of(model, batch, text_tokens=TEXT_TOKENS, device=device)


def _bytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in tree_leaves(tree) if isinstance(x, torch.Tensor))


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass
class BlockCost:
    name: str
    params: int  # trainable elements in its phase
    flops: int  # one forward of one row
    input_bytes: int  # its call's tensors, one row
    output_bytes: int  # its output, one row
    saved_bytes: int  # what autograd keeps from one training forward, one row
    saved_at_batch: int = 0  # what autograd keeps from one training forward at the per-rank batch


@dataclass
class MemoryPlan:
    model: str
    world_size: int
    zero_stage: int
    rows_per_rank: int
    batch_per_rank: int
    precision: str
    teacher_bytes: int
    student_bytes: int
    optimizer_bytes: int  # gradients, Adam moments and ZeRO's fp32 partition of the largest block
    cache_bytes: int  # peak over blocks: carried outputs + the block's inputs and targets, all rows of the rank
    cache_memory_bytes: int  # of which in device memory (distill.cache_mb)
    cache_disk_bytes: int  # and on local disk (distill.cache_disk_mb); past both, capture recomputes
    activation_bytes: int  # the largest block's saved activations at the per-rank batch
    attention_bytes: int  # the largest quantized attention call's fp32 scores at the batch, within its chunk bound
    capture_fwd_per_row: float  # forward-equivalents of the whole model per row for capture (all blocks)
    train_fwd_per_row: float  # forward-equivalents per row for training (forward + backward = 3)
    blocks: list[BlockCost] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return (self.teacher_bytes + self.student_bytes + self.optimizer_bytes + self.cache_memory_bytes
                + self.activation_bytes + self.attention_bytes)

    def rows(self) -> list[tuple[str, str]]:
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / MIB:.1f} MiB"  # noqa: E731
        largest = max(self.blocks, key=lambda b: b.params)
        return [("calibration rows / batch", f"{self.rows_per_rank} / {self.batch_per_rank}"),
                ("teacher (fp32)", gib(self.teacher_bytes)),
                ("student (fp32, quantizer state)", gib(self.student_bytes)),
                (f"optimizer, largest block {largest.name} (ZeRO {self.zero_stage})", gib(self.optimizer_bytes)),
                ("block-input cache, all rows (in memory + on disk)",
                 f"{gib(self.cache_bytes)} ({gib(self.cache_memory_bytes)} + {gib(self.cache_disk_bytes)})"),
                (f"activations, largest block, at the batch ({self.precision})", gib(self.activation_bytes)),
                ("attention scores, largest call (within quant.attention_chunk_mb)", gib(self.attention_bytes)),
                ("peak (sum of the memory parts)", gib(self.peak_bytes)),
                ("capture, forward-equivalents per row (carry, or prefix when the cache does not fit)",
                 f"{self.capture_fwd_per_row:.2f}"),
                ("training, forward-equivalents per row", f"{self.train_fwd_per_row:.1f}")]


def _calls(model, blocks, example) -> tuple[dict, dict]:
    """Each block's call (args, kwargs) in one forward of `model` on `example`, and its output's bytes."""
    calls, outputs = {}, {}

    def record(store, k, value):  # hooks returning None leave the call and the output alone
        store.setdefault(k, value)

    hooks = []
    for k, b in enumerate(blocks):
        hooks.append(b.module.register_forward_pre_hook(lambda m, a, kw, k=k: record(calls, k, (a, kw)),
                                                        with_kwargs=True))
        hooks.append(b.module.register_forward_hook(lambda m, a, out, k=k: record(outputs, k, _bytes(out))))
    try:
        with torch.no_grad():
            set_timesteps(model, example["timestep"])
            model(**example)
    finally:
        for h in hooks:
            h.remove()
    return calls, outputs


def attention_scores_per_row(model: nn.Module, example: dict) -> int:
    """Bytes of the largest attention call's fp32 scores (heads x queries x keys) for one row of `example`."""
    from diffusers.models.attention_processor import Attention

    largest = [0]

    def record(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        queries = x.shape[2] * x.shape[3] if x.dim() == 4 else x.shape[1]
        keys = queries if context is None else context.shape[1]
        largest[0] = max(largest[0], m.heads * queries * keys * 4)

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for h in hooks:
            h.remove()
    return largest[0]


def _run_costs(block: nn.Module, args, kwargs) -> tuple[int, int]:
    """(forward FLOPs, bytes autograd saves) of one training forward of `block` on its call."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    params = list(block.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(*args, **kwargs)
    finally:
        for p in params:
            p.requires_grad_(False)
    return counter.get_total_flops(), saved[0]


def _block_costs(teacher, student, blocks_fp, blocks_q, recipe: str, make_inputs, batch: int) -> list[BlockCost]:
    """Every block's costs at a batch of 1 and at the per-rank `batch` (at least 2). Per-row figures are their
    difference over the extra rows: what does not grow with the batch (weights saved for backward, their
    fake-quantized copies) is left out of them. Saved activations are also kept as measured at the batch, where
    quantized attention is chunked (and checkpointed) as training will chunk it."""
    sizes = (1, max(2, batch))
    inputs = {n: make_inputs(n) for n in sizes}
    fp = {n: _calls(teacher, blocks_fp, inputs[n]) for n in sizes}
    q = {n: _calls(student, blocks_q, inputs[n])[0] for n in sizes}
    costs = []
    for k, b in enumerate(blocks_q):
        runs = []
        for n in sizes:
            set_timesteps(student, inputs[n]["timestep"])  # the tables route the batch run here
            runs.append(_run_costs(b.module, *q[n][k]))
        extra = sizes[1] - 1
        flops, saved = ((y - x) // extra for x, y in zip(*runs))
        fp_in = [_bytes(fp[n][0][k]) for n in sizes]
        fp_out = [fp[n][1][k] for n in sizes]
        if recipe == "qdiffusion":  # AdaRound's α: one per weight element of every quantized layer
            trainable = sum(m.weight.numel() for m in b.module.modules() if isinstance(m, QUANT_LAYERS))
        else:  # DilateQuant: every weight, bias and step size of the block
            trainable = sum(p.numel() for p in b.module.parameters())
        costs.append(BlockCost(b.name, trainable, flops, (fp_in[1] - fp_in[0]) // extra,
                               (fp_out[1] - fp_out[0]) // extra, saved, saved_at_batch=runs[1][1]))
    return costs


def plan(cfg, model_source: str, rows: int, world_size: int = 1, zero_stage: int = 2,
         timesteps: int = 50) -> MemoryPlan:
    """The plan of `qdistill train` with TrainConfig `cfg` on the model `model_source` (see meta_model), with
    `rows` calibration rows in all (split over `world_size` ranks) and `timesteps` rows per activation table."""
    if cfg.distill.batch_size % world_size:
        raise ConfigError(f"distill.batch_size {cfg.distill.batch_size} is not a multiple of {world_size} ranks")
    teacher = meta_model(model_source)
    student = quantize_(copy.deepcopy(teacher), cfg.quant, init_weights=False)
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.requires_grad_(False)
    probe = example_inputs(teacher, 2)
    blocks_fp, blocks_q = find_blocks(teacher, probe), find_blocks(student, probe)
    batch = cfg.distill.batch_size // world_size
    costs = _block_costs(teacher, student, blocks_fp, blocks_q, cfg.method, lambda b: example_inputs(teacher, b),
                         batch)

    # tables: a (Δ, z) row per timestep and quantizer, 4-byte values (meta tables hold one row)
    tables = sum(1 for m in student.modules() if isinstance(m, TemporalQuantizer))
    student_bytes = state_bytes(student) + tables * (timesteps - 1) * 2 * 4
    largest = max(c.params for c in costs)
    shard = lambda stage: world_size if zero_stage >= stage else 1  # noqa: E731
    # fp32 gradients (partitioned at ZeRO 2), Adam's two moments (ZeRO 1+), and at ZeRO 1+ DeepSpeed's fp32
    # copy of this rank's partition of the weights
    optimizer = largest * 4 // shard(2) + largest * 8 // shard(1) + (largest * 4 // world_size if zero_stage else 0)

    rows_per_rank = -(-rows // world_size)
    graph = trace_block_graph(teacher, [b.module for b in blocks_fp], probe)
    chains = 1 + (cfg.distill.block_input == "quantized")  # the student's carried outputs too
    last = len(costs) if cfg.distill.max_blocks is None else min(len(costs), cfg.distill.max_blocks)
    cache = 0
    for k, c in enumerate(costs[:last]):
        held = c.input_bytes + c.output_bytes  # block k's inputs and its targets (the teacher's output)
        if graph is not None and cfg.distill.capture == "carry":
            reader = lambda j: min(graph.last_reader(j), last - 1)  # noqa: E731 (nothing carried past the last trained block)
            held += sum(costs[j].output_bytes for j in range(k) if reader(j) >= k) * chains
            if reader(k) > k and chains == 2:  # at the block's end: the trained student block's outputs, to carry
                held += c.output_bytes
        cache = max(cache, held * rows_per_rank)
    cache_memory = min(cache, cfg.distill.cache_mb * MIB)
    cache_disk = min(cache - cache_memory, cfg.distill.cache_disk_mb * MIB)
    carry = graph is not None and cfg.distill.capture == "carry" and cache_memory + cache_disk >= cache

    act_scale = 0.5 if cfg.precision in ("bf16", "fp16") else 1.0  # autocast: 2-byte activations (an estimate)
    activation = int(max(c.saved_at_batch for c in costs) * act_scale)

    scores = attention_scores_per_row(teacher, example_inputs(teacher, 1)) * batch
    bound = cfg.quant.attention_chunk_mb * MIB
    attention = scores if not cfg.quant.quantize_attention or not bound else min(scores, bound)

    total = sum(c.flops for c in costs)
    if carry:  # teacher and student once per trained block
        capture = sum(c.flops * (2 if k < last - 1 else 1) for k, c in enumerate(costs[:last])) / total
    else:  # both models up to each block (asked for, or what the trainer falls back to when the cache does not fit)
        capture = sum(2 * sum(x.flops for x in costs[:k + 1]) for k in range(last)) / total
    iterations = cfg.distill.iterations if cfg.method == "dilatequant" else (
        cfg.qdiffusion.rounding_iterations + cfg.qdiffusion.act_iterations)
    train = sum(3 * c.flops * iterations * batch for c in costs[:last]) / (total * rows_per_rank)
    return MemoryPlan(model=model_source, world_size=world_size, zero_stage=zero_stage,
                      rows_per_rank=rows_per_rank, batch_per_rank=batch, precision=cfg.precision,
                      teacher_bytes=state_bytes(teacher), student_bytes=student_bytes, optimizer_bytes=optimizer,
                      cache_bytes=cache, cache_memory_bytes=cache_memory, cache_disk_bytes=cache_disk,
                      activation_bytes=activation,
                      attention_bytes=attention, capture_fwd_per_row=capture,
                      train_fwd_per_row=train, blocks=costs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Per-rank memory and compute of a `qdistill train` run, on meta")
    parser.add_argument("--model", required=True, help="model folder, diffusers config.json, or a shape name")
    parser.add_argument("--config", default="dilatequant", help="train config (a recipe name or a YAML path)")
    parser.add_argument("--rows", type=int, default=5120, help="calibration rows in all (default 5120)")
    parser.add_argument("--ranks", default="1", help="rank counts, comma-separated: one column each (1,8)")
    parser.add_argument("--timesteps", type=int, default=50, help="rows per activation table (default 50)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the train config")
    args = parser.parse_args(argv)
    try:
        try:
            ranks = [int(n) for n in args.ranks.split(",")]
        except ValueError:
            raise ConfigError(f"--ranks {args.ranks}: rank counts are whole numbers, comma-separated (1,8)") from None
        cfg = load_config(TrainConfig, args.config, args.overrides)
        stage = int(load_deepspeed_config(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0))
        plans = [plan(cfg, args.model, args.rows, n, stage, args.timesteps) for n in ranks]
    except QdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = plans[0]
    print(f"{args.model}: {sum(b.params for b in p.blocks) / 1e6:.1f}M trainable in {len(p.blocks)} blocks; "
          f"{cfg.method} {cfg.quant.tag}, batch {cfg.distill.batch_size}, {args.rows} rows, ZeRO {stage}, "
          f"{cfg.precision}, cache_mb={cfg.distill.cache_mb}, capture={cfg.distill.capture}")
    print("| per rank | " + " | ".join(f"{n} rank{'s' if n > 1 else ''}" for n in ranks) + " |")
    print("|---|" + "---:|" * len(plans))
    for i, (label, _) in enumerate(p.rows()):
        print(f"| {label} | " + " | ".join(q.rows()[i][1] for q in plans) + " |")
    return 0
