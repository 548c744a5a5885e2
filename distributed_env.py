"""The rank environment of a run, and a check that all ranks see the same folders.

torchrun and the deepspeed launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `srun` sets
only SLURM_* variables, which are translated here, and a plain `python` gets one-process defaults. On several
nodes with node-local disks rank 0 would resume from a checkpoint the other ranks never see, and the job would
hang: check_shared_folders makes that one error on every rank instead.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import time
import uuid
from pathlib import Path

import torch

from .errors import ConfigError
from .files import atomic_write_text

logger = logging.getLogger(__name__)
MARKER = ".qdistill-rank0"  # what rank 0 writes into each folder it must share with the other ranks
_RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_hostlist(nodelist: str) -> list[str]:
    """The hosts of a Slurm hostlist: "node[03-05,09],gpu7" -> node03 node04 node05 node09 gpu7 (one bracket
    group per host item, zero padding kept)."""
    hosts = []
    for item in filter(None, re.split(r",(?![^\[]*\])", nodelist.strip())):  # commas inside brackets don't split
        m = re.fullmatch(r"([^\[\]]*)(?:\[(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)\])?([^\[\]]*)", item)
        if m is None:
            raise ConfigError(f"cannot read the Slurm host list {nodelist!r}: set MASTER_ADDR to the host of rank 0")
        prefix, ranges, suffix = m.groups()
        if ranges is None:
            hosts.append(item)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{str(i).zfill(len(lo))}{suffix}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def _int_env(key: str) -> int:
    try:
        return int(os.environ[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={os.environ[key]!r} is not an integer") from None


def _slurm_step() -> dict[str, str] | None:
    """RANK ... MASTER_PORT of this task of a multi-task `srun` step; None outside one."""
    env = os.environ
    if "SLURM_STEP_NUM_TASKS" in env:
        tasks = _int_env("SLURM_STEP_NUM_TASKS")
    elif "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        tasks = _int_env("SLURM_NTASKS")
    else:
        tasks = 1
    if tasks <= 1:
        if "SLURM_NTASKS" in env and _int_env("SLURM_NTASKS") > 1:
            # e.g. `sbatch --ntasks=8` running `python -m qdistill train` in its script: one process, 7 idle tasks
            logger.warning(f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process is not in a multi-task job step: "
                           "it runs as one process; launch with `srun` (one task per GPU) or torchrun to use them all")
        return None
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
    if missing:
        raise ConfigError(f"srun started {tasks} tasks but {' and '.join(missing)} is not set: set RANK, WORLD_SIZE, "
                          "LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself")
    rank, local_rank = _int_env("SLURM_PROCID"), _int_env("SLURM_LOCALID")
    if not 0 <= rank < tasks or not 0 <= local_rank <= rank:
        raise ConfigError(f"inconsistent Slurm environment: SLURM_PROCID={rank}, SLURM_LOCALID={local_rank} "
                          f"for a step of {tasks} tasks (SLURM_STEP_NUM_TASKS / SLURM_NTASKS)")
    values = dict(RANK=str(rank), WORLD_SIZE=str(tasks), LOCAL_RANK=str(local_rank))
    for key in ("WORLD_SIZE", "LOCAL_RANK"):  # e.g. a stale `export WORLD_SIZE=...` in the batch script
        if key in env and env[key] != values[key]:
            raise ConfigError(f"environment variable {key}={env[key]} disagrees with srun's {values[key]}: unset it")
    nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)),
                    None)
    if "MASTER_ADDR" not in env:
        hosts = expand_hostlist(nodelist) if nodelist else []
        if not hosts:
            raise ConfigError(f"srun started {tasks} tasks but the host of rank 0 is unknown: set MASTER_ADDR (or "
                              "SLURM_STEP_NODELIST / SLURM_JOB_NODELIST)")
        values["MASTER_ADDR"] = hosts[0]  # srun places task 0 on the step's first node
    if "MASTER_PORT" not in env:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job or not job.isdigit():
            raise ConfigError(f"srun started {tasks} tasks but SLURM_JOB_ID is not set: set MASTER_PORT")
        values["MASTER_PORT"] = str(20000 + int(job) % 20000)  # the same on every task, without talking
    return values


def fill_rank_environment() -> list[str]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from an `srun` step, or to one-process
    defaults, unless RANK is set (torchrun, the deepspeed launcher); variables already set are kept. Returns
    the keys set here, for the caller to pop when its process group ends."""
    if "RANK" in os.environ:
        return []
    values = _slurm_step() or dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                   MASTER_PORT=str(free_port()))
    set_here = [k for k in _RANK_KEYS if k in values and k not in os.environ]
    os.environ.update({k: values[k] for k in set_here})
    return set_here


@contextlib.contextmanager
def rank_environment():
    """(rank, world size) of this process, from its launcher, srun or one-process defaults, for a stage that
    makes its own process group; the variables set for it are taken back at the end."""
    set_here = fill_rank_environment()
    try:
        yield int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    finally:
        for key in set_here:
            os.environ.pop(key, None)


@contextlib.contextmanager
def process_group(backend: str = "gloo"):
    """(rank, world size, local rank) for a stage that only waits for and gathers from its ranks (calibrate, eval):
    a `backend` group under torchrun or srun when none exists yet, destroyed at the end; none for a plain run. The
    rank variables set for it are taken back at the end. (Training makes its group through DeepSpeed:
    trainer/launch.py.)"""
    with rank_environment() as (rank, world_size):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = world_size > 1 and not torch.distributed.is_initialized()
        if owns:
            torch.distributed.init_process_group(backend)  # torchrun also sets OMP_NUM_THREADS=1 per rank
        try:
            yield rank, world_size, local_rank
        finally:
            if owns:
                torch.distributed.destroy_process_group()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _sees(folder: Path, token: str, settle_s: float) -> bool:
    """Whether `folder`'s marker holds `token`; retried for `settle_s` (an NFS client may cache a directory)."""
    deadline = time.monotonic() + settle_s
    while True:
        if _read(folder / MARKER) == token.encode():
            return True
        if time.monotonic() >= deadline:
            return False
        try:
            os.listdir(folder)  # makes an NFS client revalidate the directory
        except OSError:
            pass
        time.sleep(0.2)


def _ranks(ranks: list[int], reports: list[dict]) -> str:
    named = [f"rank {r} (host {reports[r]['host']})" for r in ranks[:3]]
    return ", ".join(named) + (f" and {len(ranks) - 3} more ranks" if len(ranks) > 3 else "")


def from_rank0(fn, rank: int, world_size: int):
    """`fn()` computed on rank 0 only and its (picklable) result returned on every rank: work every rank would
    repeat with the same answer (hashing the model folder). A collective when world_size > 1; an error on rank 0
    is raised on every rank, so none waits for a result that never comes."""
    if world_size <= 1:
        return fn()
    import torch.distributed as dist

    box, error = [None], None
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # still broadcast, then raise it here with its traceback
            box[0], error = ("error", e), e
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def check_shared_folders(folders: dict[str, Path], rank: int, world_size: int, write: dict[str, Path] | None = None,
                         settle_s: float = 5.0) -> None:
    """Raise the same one-line ConfigError on every rank unless all ranks see the same folders. `folders`
    maps config keys to folders the ranks only read (their manifest.json must have the same bytes on every
    rank); `write` maps config keys to folders rank 0 writes and all ranks read (rank 0 creates them and writes
    a random token into MARKER, which every rank must read back). Needs the default process group when
    world_size > 1; a collective call: every rank must call it with the same keys."""
    if world_size <= 1:
        return
    import torch.distributed as dist

    write = write or {}
    report = dict(host=socket.gethostname(), error="", seen={}, digests={},
                  paths={k: str(p) for k, p in {**write, **folders}.items()})
    tokens = [None]
    if rank == 0:
        tokens[0] = {}
        for key, folder in write.items():
            token = uuid.uuid4().hex
            try:
                atomic_write_text(Path(folder) / MARKER, token)  # creates the folder too
                tokens[0][key] = token
            except OSError as e:  # still take part in the collectives below, or the others wait forever
                report["error"] = f"config key '{key}': rank 0 (host {report['host']}) cannot write {folder}: {e}"
    dist.broadcast_object_list(tokens, src=0)
    for key, folder in write.items():
        token = tokens[0].get(key)
        report["seen"][key] = token is not None and _sees(Path(folder), token, settle_s if rank else 0)
    for key, folder in folders.items():
        data = _read(Path(folder) / "manifest.json")
        report["digests"][key] = None if data is None else hashlib.sha256(data).hexdigest()
    reports: list = [None] * world_size
    dist.all_gather_object(reports, report)

    # every rank has the same reports, so every rank builds the same message
    errors = [r["error"] for r in reports if r["error"]]
    for key in write:
        if key in tokens[0]:
            blind = [r for r, rep in enumerate(reports) if not rep["seen"][key]]
            if blind:
                where = reports[blind[0]]["paths"][key]
                wrote = reports[0]["paths"][key]
                errors.append(f"config key '{key}': {_ranks(blind, reports)} does not see what rank 0 wrote in {wrote}"
                              + (f" (looked in {where})" if where != wrote else "")
                              + f" ({key} must be one folder shared by all ranks, not a node-local disk)")
    for key in folders:
        digests = [rep["digests"][key] for rep in reports]
        unread = [r for r, d in enumerate(digests) if d is None]
        if unread:
            path = Path(reports[unread[0]]["paths"][key]) / "manifest.json"
            errors.append(f"config key '{key}': {_ranks(unread, reports)} cannot read {path}")
        elif len(set(digests)) > 1:
            other = [r for r, d in enumerate(digests) if d != digests[0]]
            path = Path(reports[other[0]]["paths"][key]) / "manifest.json"
            errors.append(f"config key '{key}': {_ranks(other, reports)} reads a different {path} than rank 0 "
                          f"({key} must be one folder shared by all ranks)")
    if errors:
        raise ConfigError("; ".join(errors))
