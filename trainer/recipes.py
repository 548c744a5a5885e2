"""The recipes `qdistill train` runs, chosen by the config's `recipe` key: the phases every block goes through."""
from __future__ import annotations

from ..configs import ConfigError
from .phases import DistillPhase, Phase
from .qdiffusion import qdiffusion_phases

RECIPES = ("dilatequant", "qdiffusion")


def recipe_phases(cfg) -> list[Phase]:
    """The phases of a TrainConfig's recipe: DilateQuant's one BKD phase, or Q-Diffusion's rounding then
    activation step sizes."""
    if cfg.method == "dilatequant":
        return [DistillPhase(cfg.distill)]
    if cfg.method == "qdiffusion":
        return qdiffusion_phases(cfg.qdiffusion)
    raise ConfigError(f"config key 'method': unknown method {cfg.method!r} (known: {', '.join(RECIPES)})")
