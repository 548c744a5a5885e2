"""Q-Diffusion's block reconstruction (BRECQ + AdaRound; docs/design.md §3.6), as two phases per block.

1. `RoundingPhase`: the block's weights choose their rounding (AdaRound) against the block-output loss
   (lp with p = 2) plus λ·Σ(1 − |2h − 1|^β), β annealed 20 → 2 after a 20 % warm-up with the regulariser off.
   Activation quantizers inside the block are off, as in Q-Diffusion's weight calibration. At the end the
   decisions are hardened into the weights (grid values), and the weights never train.
2. `ActivationStepPhase`: the step sizes of the block's activation quantizers (LSQ) learn against the lp
   loss with p = 2.4, at an absolute Adam rate with a cosine decay, weights frozen on their grid.

`cfg` is a QDiffusionConfig (configs/schema.py).
"""
from __future__ import annotations

import math

from torch import nn

from ..quantizers import TemporalQuantizer
from ..quantizers.adaround import (adaround_quantizers, attach_adaround, beta_at, hard_fraction, harden,
                                   rounding_regularizer)
from .phases import Phase, cosine, per_sample_lp


def _set_activation_quantization(block: nn.Module, enabled: bool) -> None:
    for m in block.modules():
        if isinstance(m, TemporalQuantizer):
            m.enabled = enabled


class RoundingPhase(Phase):
    """Phase 1: AdaRound on every quantized layer of the block; only α learns; the block's activations unquantized."""

    name = "rounding"
    keeps_best_inside = False  # soft rounding, activations off: not the block `leave` makes

    def __init__(self, cfg):
        self.cfg = cfg
        self.iterations = cfg.rounding_iterations

    def enter(self, block: nn.Module) -> None:
        attach_adaround(block)  # frozen parameters stay frozen; only α (new) requires grad
        _set_activation_quantization(block, False)

    def param_groups(self, block: nn.Module) -> list[dict]:
        alphas = [q.alpha for q in adaround_quantizers(block)]
        return [{"params": alphas, "lr": self.cfg.lr_rounding, "name": "rounding", "scale": 1.0}] if alphas else []

    def loss(self, block, out, target, iteration):
        per_sample = per_sample_lp(out, target, self.cfg.rounding_p)
        total = per_sample.mean()
        c = self.cfg
        beta = beta_at(iteration + 1, self.iterations, c.warmup, c.beta_start, c.beta_end)
        self.regularizer = None
        if beta is not None:
            reg = sum(rounding_regularizer(q.soft_targets(), beta) for q in adaround_quantizers(block))
            total = total + c.rounding_lambda * reg
            self.regularizer = reg.detach()
        return per_sample, total

    def scalars(self, block, iteration):
        c = self.cfg
        beta = beta_at(iteration + 1, self.iterations, c.warmup, c.beta_start, c.beta_end)
        if beta is None:
            return {}
        return {"beta": beta, "regularizer": float(self.regularizer) if self.regularizer is not None else math.nan,
                "settled": hard_fraction(adaround_quantizers(block))}

    def leave(self, block: nn.Module) -> None:
        harden(block)
        _set_activation_quantization(block, True)
        super().leave(block)


class ActivationStepPhase(Phase):
    """Phase 2: the step sizes of the block's activation quantizers; zero points and grid weights stay."""

    name = "activations"

    def __init__(self, cfg):
        self.cfg = cfg
        self.iterations = cfg.act_iterations

    def enter(self, block: nn.Module) -> None:
        for m in block.modules():
            if isinstance(m, TemporalQuantizer):
                m.delta.requires_grad_(True)

    def param_groups(self, block: nn.Module) -> list[dict]:
        deltas = [m.delta for m in block.modules() if isinstance(m, TemporalQuantizer)]
        return [{"params": deltas, "lr": self.cfg.lr_act, "name": "step_size", "scale": 1.0}] if deltas else []

    def lr_factor(self, i: int) -> float:
        return cosine(i, self.iterations)

    def loss(self, block, out, target, iteration):
        per_sample = per_sample_lp(out, target, self.cfg.act_p)
        return per_sample, per_sample.mean()


def qdiffusion_phases(cfg) -> list[Phase]:
    return [RoundingPhase(cfg), ActivationStepPhase(cfg)]
