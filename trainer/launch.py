"""Process-group setup for the four ways `qdistill train` is launched: plain `python` (one process),
`torchrun --nproc_per_node=N -m qdistill`, `deepspeed --num_gpus N --module qdistill` and, on Slurm,
`srun python -m qdistill train ...` (one task per GPU). torchrun and the deepspeed launcher set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; srun's SLURM_* variables and a plain run get them from
distributed_env.fill_rank_environment. Without a GPU, DeepSpeed runs on its CPU accelerator over gloo."""
from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

import torch

from ..configs import CONFIG_DIR, ConfigError
from ..devices import resolve_device
from ..distributed_env import fill_rank_environment

logger = logging.getLogger(__name__)
_SET_HERE: list[str] = []  # the environment variables init_distributed set (a plain run, or srun's translation)


def init_distributed(device: str = "auto", timeout_minutes: float = 60.0) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed on `device` (auto|cpu|cuda: NCCL on GPUs, gloo on the
    CPU); return (rank, world_size, the rank's torch device)."""
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        resolve_device("cuda")  # the one-line error
    if on_gpu and os.environ.get("DS_ACCELERATOR") == "cpu":
        logger.warning("DS_ACCELERATOR=cpu is set on a machine with a GPU: DeepSpeed runs on the CPU and so does "
                       "this run; unset DS_ACCELERATOR to train on the GPU")
        on_gpu = False
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the deepspeed import
    _SET_HERE.extend(fill_rank_environment())  # nothing under torchrun or the deepspeed launcher
    device = resolve_device("cuda") if on_gpu else torch.device("cpu")  # set before NCCL makes communicators
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    timeout = datetime.timedelta(minutes=timeout_minutes)  # rank 0 writes checkpoints while the others wait
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not torch.distributed.is_initialized():
        # After torchrun restarts failed workers it hands the new ones the same agent store, still holding the
        # dead workers' gloo addresses; a prefix per restart keeps the new group from dialling them.
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           int(os.environ["WORLD_SIZE"]), is_master=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore(f"qdistill/{attempt}", store),
                                             rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                             timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    if accelerator.device_name() == "cpu":  # DeepSpeed's accelerator decides where the engines put the blocks
        device = torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def release_distributed() -> None:
    """End the process group, and take back the environment init_distributed set for it (a later run in the
    same process, or a process it starts, must not inherit rank 0's address)."""
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, stale in a later run
    for key in _SET_HERE:
        os.environ.pop(key, None)
    _SET_HERE.clear()


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
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"DeepSpeed config {path}: '{key}' is not supported here (qdistill builds the optimizer "
                              "and LR schedule from distill.*)")
    for key in ("fp16", "bf16", "torch_autocast"):
        if config.get(key, {}).get("enabled"):
            raise ConfigError(f"DeepSpeed config {path}: '{key}' is not supported here (the quantizers' step sizes "
                              "and the optimizer stay fp32; set precision=bf16 or fp16 for forwards under autocast)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1 or 2, got {stage}")
    return config
