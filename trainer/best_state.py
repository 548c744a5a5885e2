"""Never worse than the start: the best state of a block that a phase has reached, on the held-out batch.

A phase starts from its block's state as it found it (the block-output MSE of that state measured first), and
every `distill.eval_every` iterations and at its end the trainer offers the block's current state; a lower MSE
replaces the kept one. At the phase's end the block takes the kept state back if training ended worse. The kept
state travels in mid-phase checkpoints, so a resumed run keeps what an uninterrupted one would.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _copy(block: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


class BestState:
    """The lowest-MSE state offered so far: `mse`, `where` it was reached ("start", "iteration N", "end")."""

    def __init__(self, block: nn.Module, mse: float, where: str = "start",
                 state: dict[str, torch.Tensor] | None = None, start: float | None = None):
        self.start = mse if start is None else start  # the MSE the phase started from
        self.mse, self.where = (mse if math.isfinite(mse) else math.inf), where
        self.state = _copy(block) if state is None else state

    def offer(self, block: nn.Module, mse: float, where: str) -> None:
        """Keep the block's current state if its MSE is lower (a non-finite MSE never is)."""
        if math.isfinite(mse) and mse < self.mse:
            self.mse, self.where, self.state = mse, where, _copy(block)

    def restore(self, block: nn.Module) -> None:
        block.load_state_dict(self.state, strict=True)

    def info(self) -> dict:
        return {"mse": self.mse, "where": self.where, "start": self.start}
