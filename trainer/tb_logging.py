"""What block-wise training writes to TensorBoard (docs/design.md §4): loss per block and per timestep bucket,
learning rates, gradient norm, samples/s, peak memory, and step-size histograms after every block."""
from __future__ import annotations

import resource

import torch
from torch import nn

from ..quantizers import TemporalQuantizer, UniformQuantizer

TIMESTEP_BUCKETS = 4  # loss is also logged per quarter of the 0..1000 timestep range
LR_TAGS = {"weights": "lr/weights", "step_size": "lr/quantizers", "rounding": "lr/rounding"}  # group name prefix


def log_scalars(writer, engine, name: str, step: int, loss: float, per_sample: torch.Tensor, t: torch.Tensor,
                samples_per_s: float, extra: dict) -> None:
    writer.add_scalar(f"loss/{name}", loss, step)
    writer.add_scalar("loss/all_blocks", loss, step)
    width = 1000 // TIMESTEP_BUCKETS
    per_sample = per_sample.detach().cpu()
    buckets = (t.detach().cpu().clamp(0, 999) // width).long()
    for b in buckets.unique().tolist():
        writer.add_scalar(f"loss_by_timestep/{b * width:03d}-{(b + 1) * width - 1:03d}",
                          per_sample[buckets == b].mean().item(), step)
    groups = engine.optimizer.param_groups
    for prefix, tag in LR_TAGS.items():
        group = next((g for g in groups if g.get("name", "").startswith(prefix)), None)
        if group is not None:  # step sizes: the rate relative to their scale, as configured
            writer.add_scalar(tag, group["lr"] / group.get("scale", 1.0), step)
    for tag, value in extra.items():
        writer.add_scalar(tag, value, step)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        writer.add_scalar("grad_norm", float(grad_norm), step)
    writer.add_scalar("samples_per_s", samples_per_s, step)
    writer.add_scalar("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step)
    if torch.cuda.is_available():
        writer.add_scalar("peak_gpu_mb", torch.cuda.max_memory_allocated() / 2**20, step)


def log_block(writer, block: nn.Module, name: str, k: int, summary: dict) -> None:
    """After block k: its step-size histograms and its held-out output MSE before training, where training ended
    and what the block keeps (curves over the blocks)."""
    for mname, m in block.named_modules():
        if isinstance(m, (UniformQuantizer, TemporalQuantizer)):
            writer.add_histogram(f"step_size/{name}.{mname}", m.delta.detach().abs().cpu(), k)
    writer.add_scalar("block_mse/init", summary["init_mse"], k)
    writer.add_scalar("block_mse/final", summary["final_mse"], k)
    writer.add_scalar("block_mse/kept", summary["best_mse"], k)
