"""What a block learns, in which order: the phases of a recipe.

The BlockDistiller owns everything shared by the recipes (block inputs and targets, data-parallel rows,
one DeepSpeed engine per phase, checkpoints, logging). A phase says which parameters of the block learn,
at which rates, against which loss, and what happens to the block before and after. DilateQuant has one
phase per block (DistillPhase, below); Q-Diffusion has two (trainer/qdiffusion.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..quantizers import TemporalQuantizer, UniformQuantizer, block_output


def per_sample_mse(out, target: torch.Tensor) -> torch.Tensor:
    """The distillation loss of every sample: MSE of a block's output against its FP twin's."""
    return (block_output(out).float() - target.float()).pow(2).flatten(1).mean(1)


def per_sample_lp(out, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's / Q-Diffusion's reconstruction loss of every sample: |x̂ − x|^p summed over channels (dim 1),
    averaged over the remaining positions. Its batch mean is their `lp_loss` (`.sum(1).mean()`), the scale
    their rounding-regulariser weight λ was set against."""
    err = (block_output(out).float() - target.float()).abs().pow(p)
    return err.sum(1).flatten(1).mean(1) if err.dim() > 2 else err.sum(1)


def parameter_groups(block: nn.Module, lr_weights: float, lr_quant: float) -> list[dict]:
    """Optimizer groups: the weights (and biases) at `lr_weights`; the step sizes, one group per quantizer at
    `lr_quant` times that quantizer's mean step size, so that every step size moves by about the same fraction
    per update (Adam's updates are about lr in absolute terms whatever a parameter's scale, and an 8-bit
    step size is 16x smaller than a 4-bit one of the same range); the zero points (integer units) at
    `lr_quant`."""
    groups, zero_points, quant_ids = [], [], set()
    for name, m in block.named_modules():
        if isinstance(m, (UniformQuantizer, TemporalQuantizer)):
            quant_ids.update(id(p) for p in m.parameters())
            if m.delta.requires_grad:
                scale = m.delta.detach().abs().mean().clamp_min(1e-8).item()
                groups.append({"params": [m.delta], "lr": lr_quant * scale, "name": f"step_size:{name}",
                               "scale": scale})
            if isinstance(m.zero, nn.Parameter) and m.zero.requires_grad:
                zero_points.append(m.zero)
    weights = [p for p in block.parameters() if p.requires_grad and id(p) not in quant_ids]
    groups = [{"params": weights, "lr": lr_weights, "name": "weights", "scale": 1.0}] + groups
    groups.append({"params": zero_points, "lr": lr_quant, "name": "zero_points", "scale": 1.0})
    return [g for g in groups if g["params"]]


def cosine(i: int, iterations: int) -> float:
    """LR factor of a cosine decay to zero over `iterations`."""
    return 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations))


class Phase:
    """One stage of a block's training. `enter` prepares the block (what is trainable, what is quantized);
    it is also called before a mid-phase checkpoint is loaded, so any state it adds (AdaRound's α) is in the
    student's state dict. `leave` ends the phase and leaves every parameter frozen."""

    name: str = "phase"
    iterations: int = 0
    # whether the block's state inside the phase is what it will be after `leave`, so that it can be judged and
    # kept mid-phase (never-worse, trainer/best_state.py); otherwise only the end is compared with the start
    keeps_best_inside: bool = True

    def enter(self, block: nn.Module) -> None:
        raise NotImplementedError

    def param_groups(self, block: nn.Module) -> list[dict]:
        """Adam parameter groups (with a "name"); empty when the block has nothing to learn in this phase."""
        raise NotImplementedError

    def lr_factor(self, i: int) -> float:
        return 1.0

    def loss(self, block: nn.Module, out, target: torch.Tensor, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For `out` = block(inputs) at 0-based `iteration` of this phase: (per-sample reconstruction loss, the
        scalar to minimise on this rank). No host sync: the trainer reads values once per iteration."""
        raise NotImplementedError

    def scalars(self, block: nn.Module, iteration: int) -> dict:
        """Extra values to log after `iteration` (called only on logging iterations; may sync)."""
        return {}

    def leave(self, block: nn.Module) -> None:
        for p in block.parameters():
            p.requires_grad_(False)


class DistillPhase(Phase):
    """DilateQuant's block-wise distillation (docs/design.md §3.5): the block's full weights, step sizes, zero
    points and TPQ tables learn together against the MSE to the FP block's output. `cfg` is a DistillConfig."""

    name = "distill"

    def __init__(self, cfg):
        self.cfg = cfg
        self.iterations = cfg.iterations

    def enter(self, block: nn.Module) -> None:
        for p in block.parameters():
            p.requires_grad_(True)
        for m in block.modules():  # symmetric quantizers keep their zero point at 0
            if isinstance(m, TemporalQuantizer) and m.symmetric:
                m.zero.requires_grad_(False)

    def param_groups(self, block: nn.Module) -> list[dict]:
        return parameter_groups(block, self.cfg.lr_weights, self.cfg.lr_quant)

    def lr_factor(self, i: int) -> float:
        return 1.0 if self.cfg.lr_schedule == "constant" else cosine(i, self.iterations)

    def loss(self, block, out, target, iteration):
        per_sample = per_sample_mse(out, target)
        return per_sample, per_sample.mean()
