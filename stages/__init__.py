"""The stages, one function each: a typed config in (qdistill.configs.schema), the stage's result out. The
`qdistill` command (cli.py) is a thin layer over these.

    from qdistill.configs import load_config
    from qdistill.configs.schema import TrainConfig
    from qdistill.stages import train
    metrics = train(load_config(TrainConfig, "dilatequant", ["distill.iterations=10"]))
"""
from .calibrate import calibrate
from .evaluate import evaluate
from .export import export
from .quantize import quantize
from .sensitivity import sensitivity
from .train import train

STAGES = {"calibrate": calibrate, "quantize": quantize, "train": train, "export": export, "eval": evaluate,
          "sensitivity": sensitivity}

__all__ = ["STAGES", "calibrate", "evaluate", "export", "quantize", "sensitivity", "train"]
