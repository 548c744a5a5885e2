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
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import get_default_build_root

from ..configs import CONFIG_DIR, ConfigError
from ..devices import resolve_device
from ..distributed_env import fill_rank_environment
from ..errors import BuildLockError

logger = logging.getLogger(__name__)
_SET_HERE: list[str] = []  # the environment variables init_distributed set (a plain run, or srun's translation)
BUILD_LOCK_WAIT_S = 600  # DeepSpeed's CPU op builds in about a minute; a lock older than this is a killed build's


def build_locks() -> list[Path]:
    """The lock files of DeepSpeed op builds under torch's extension folder (torch's FileBaton: a build killed
    mid-way leaves its lock, and the next build waits on it forever, silently)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return sorted([*root.glob("deepspeed*/lock"), *root.glob("*/deepspeed*/lock")])


def wait_for_build_locks(max_wait_s: float = BUILD_LOCK_WAIT_S, poll_s: float = 2.0) -> None:
    """Wait (saying so) while another process holds a DeepSpeed build lock; a lock older than `max_wait_s` is a
    killed build's, and is named in an error instead of waited on forever."""
    warned = False
    while locks := build_locks():
        lock = locks[0]
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the build just finished
            continue
        if age > max_wait_s:
            raise BuildLockError(f"DeepSpeed's op build lock {lock} is {age / 60:.0f} min old: a build killed "
                                 "mid-way left it, and the next build would wait on it forever; delete it (with no "
                                 "other run building DeepSpeed's ops) and run again")
        if not warned:
            logger.warning(f"waiting for {lock}: another process is building DeepSpeed's ops (about a minute)")
            warned = True
        time.sleep(poll_s)


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
    wait_for_build_locks()
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
