"""Process-group setup for the three ways `qdistill train` is launched: plain `python` (one process),
`torchrun --nproc_per_node=N -m qdistill` and `deepspeed --num_gpus N --module qdistill`. torchrun and the deepspeed launcher set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain run gets single-process defaults. Without a
GPU, DeepSpeed runs on its CPU accelerator over gloo."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from ..configs import CONFIG_DIR, ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed; return (rank, world_size, device)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the deepspeed import
    if "RANK" not in os.environ:  # plain `python`: a one-process group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not torch.distributed.is_initialized():
        # After torchrun restarts failed workers it hands the new ones the same agent store, still holding the
        # dead workers' gloo addresses; a prefix per restart keeps the new group from dialling them.
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           int(os.environ["WORLD_SIZE"]), is_master=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore(f"qdistill/{attempt}", store),
                                             rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if accelerator.device_name() == "cpu" else \
        torch.device(accelerator.device_name(local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def load_deepspeed_config(name: str) -> dict:
    """A DeepSpeed JSON by path, or by file name in qdistill's configs folder. qdistill builds the optimizer
    and scheduler and sets the batch sizes; a config that sets them, or asks for ZeRO-3 (which partitions
    the parameters the hooks read), is refused with the key named."""
    path = Path(name)
    if not path.is_file() and (CONFIG_DIR / name).is_file():
        path = CONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"config key 'deepspeed': file not found: {name} (shipped: zero0.json, zero1.json, zero2.json)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    for key in ("optimizer", "scheduler", "fp16"):
        if key in config and (key != "fp16" or config[key].get("enabled")):
            raise ConfigError(f"DeepSpeed config {path}: '{key}' is not supported here (qdistill builds the optimizer "
                              "and LR schedule from distill.*; fake quantization trains in fp32 or bf16)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1 or 2, got {stage}")
    return config
