"""distributed_env: srun's SLURM_* variables become RANK ... MASTER_PORT (and a plain run gets one-process
defaults), and two real gloo ranks that do not share their `out` or `trajectories` folder both raise the same
one-line error instead of hanging. The same two ranks check the work done once on rank 0 and broadcast: a
value (the model hash), an error, and the activation tables of the TPQ init."""
import datetime
import json
import logging
import multiprocessing
import os
import threading
import time
import traceback

import pytest

from qdistill.distributed_env import MARKER, check_shared_folders, expand_hostlist, fill_rank_environment, from_rank0
from qdistill.errors import BuildLockError, ConfigError
from qdistill.trainer.launch import build_locks, wait_for_build_locks

RANK_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env():
    """os.environ without rank or Slurm variables; restored afterwards (fill_rank_environment sets keys)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key in RANK_KEYS or key.startswith("SLURM_"):
            del os.environ[key]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def srun_task(env, procid, localid, tasks=2, **extra):
    env.update(SLURM_JOB_ID="123456", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(tasks), SLURM_NTASKS=str(tasks),
               SLURM_PROCID=str(procid), SLURM_LOCALID=str(localid), **extra)


@pytest.mark.parametrize("nodelist,first", [("node[03-05,09],gpu7", "node03"), ("gpu7", "gpu7"), ("n[1-2]", "n1"),
                                            ("x[001-004]", "x001"), ("localhost", "localhost"), ("a-[1-2]-b", "a-1-b")])
def test_srun_step_sets_the_rank_variables(env, nodelist, first):
    srun_task(env, procid=1, localid=1, SLURM_STEP_NODELIST=nodelist, SLURM_JOB_NODELIST="other[1-9]")
    assert sorted(fill_rank_environment()) == sorted(RANK_KEYS)
    assert {k: env[k] for k in RANK_KEYS} == dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR=first,
                                                  MASTER_PORT=str(20000 + 123456 % 20000))


def test_hostlist_expansion():
    assert expand_hostlist("node[03-05,09],gpu7") == ["node03", "node04", "node05", "node09", "gpu7"]
    assert expand_hostlist("x[8-10]") == ["x8", "x9", "x10"]
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        expand_hostlist("r[1-2]n[3-4]")  # two bracket groups in one host: not supported, the user names the master


def test_srun_keeps_the_users_master_and_falls_back_to_the_job_nodelist(env):
    srun_task(env, procid=0, localid=0, tasks=4, MASTER_PORT="29999", SLURM_JOB_NODELIST="gpu[12-13]")
    assert sorted(fill_rank_environment()) == ["LOCAL_RANK", "MASTER_ADDR", "RANK", "WORLD_SIZE"]
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["WORLD_SIZE"]) == ("gpu12", "29999", "4")
    del env["SLURM_STEP_NUM_TASKS"]  # an older srun: SLURM_NTASKS counts the step's tasks when SLURM_STEP_ID is set
    for key in RANK_KEYS[:4]:
        del env[key]
    fill_rank_environment()
    assert env["WORLD_SIZE"] == "4"


def test_a_launcher_that_sets_rank_wins(env):
    srun_task(env, procid=1, localid=1, SLURM_STEP_NODELIST="n[1-2]")
    env.update(RANK="5", WORLD_SIZE="8")
    assert fill_rank_environment() == []
    assert "MASTER_ADDR" not in env and env["RANK"] == "5"


def test_a_plain_run_is_one_process(env):
    assert sorted(fill_rank_environment()) == sorted(RANK_KEYS)
    assert {k: env[k] for k in RANK_KEYS[:4]} == dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                                                      MASTER_ADDR="127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_sbatch_ntasks_without_srun_warns_and_runs_one_process(env, caplog):
    env.update(SLURM_JOB_ID="7", SLURM_NTASKS="8", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_JOB_NODELIST="n[1-2]")
    with caplog.at_level(logging.WARNING, logger="qdistill.distributed_env"):
        fill_rank_environment()
    assert env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"
    assert "SLURM_NTASKS=8" in caplog.text and "srun" in caplog.text


@pytest.mark.parametrize("change,expected", [
    ({}, "set MASTER_ADDR"),  # no node list at all
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "2"}, "SLURM_PROCID=2"),
    ({"SLURM_STEP_NODELIST": "n[1-2]", "WORLD_SIZE": "8"}, "WORLD_SIZE=8 disagrees"),
])
def test_an_inconsistent_srun_step_is_one_line_error(env, change, expected):
    srun_task(env, procid=1, localid=0)
    env.update(change)
    with pytest.raises(ConfigError, match=expected) as e:
        fill_rank_environment()
    assert "\n" not in str(e.value) and "RANK" not in env


def test_one_rank_checks_nothing(tmp_path):
    check_shared_folders({"trajectories": tmp_path / "none"}, 0, 1, write={"out": tmp_path / "out"})
    assert not (tmp_path / "out").exists()


def _rank(rank: int, tmp) -> None:
    """One of two gloo ranks: the folder checks of each case, and what they raised, into rank{N}.json."""
    import torch.distributed as dist

    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=30))
        cases = {  # rank 0's folders, rank 1's folders: (read, written)
            "shared": (({"trajectories": tmp / "traj"}, {"out": tmp / "nfs" / "run"}),) * 2,
            "local_out": (({}, {"out": tmp / "nfs" / "run"}), ({}, {"out": tmp / "node1" / "run"})),
            "missing_traj": (({"trajectories": tmp / "traj"}, {}), ({"trajectories": tmp / "node1" / "traj"}, {})),
            "other_traj": (({"trajectories": tmp / "traj"}, {}), ({"trajectories": tmp / "traj2"}, {})),
        }
        for name, per_rank in cases.items():
            folders, write = per_rank[rank]
            try:
                check_shared_folders(folders, rank, 2, write=write, settle_s=0.5)
                results[name] = ""
            except ConfigError as e:
                results[name] = str(e)
        calls = []
        results["from_rank0"] = from_rank0(lambda: calls.append(rank) or f"rank {rank}'s answer", rank, 2)
        results["from_rank0_calls"] = calls
        try:
            from_rank0(lambda: _raise(ConfigError(f"config key 'model': rank {rank} cannot read it")), rank, 2)
        except ConfigError as e:
            results["from_rank0_error"] = str(e)
        results["tables"] = _shared_tables(rank)
        dist.destroy_process_group()
    except BaseException:
        results["crash"] = traceback.format_exc()
    (tmp / f"rank{rank}.json").write_text(json.dumps(results))


def _raise(error):
    raise error


def _shared_tables(rank: int) -> dict:
    """Two activation quantizers: rank 0 calibrates them, rank 1 only receives the tables."""
    import torch
    from torch import nn

    from qdistill.quantizers import TemporalQuantizer
    from qdistill.trainer.student import share_activation_tables

    model = nn.ModuleList([TemporalQuantizer(4), TemporalQuantizer(8, symmetric=True, per_timestep=False)])
    if rank == 0:
        torch.manual_seed(0)
        for q in model:
            q.observing = True
            for t in (0.0, 400.0, 999.0):
                q.set_timesteps(torch.full((2,), t))
                q(torch.randn(2, 3, 8, 8) * (1 + t / 100))
            q.observing = False
            q.init_from_observations("mse")
    share_activation_tables(model, rank)
    return {k: v.tolist() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    for name, text in (("traj", '{"num_rows": 4}'), ("traj2", '{"num_rows": 5}')):
        (tmp / name).mkdir()
        (tmp / name / "manifest.json").write_text(text)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, tmp)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 90  # a rank stuck in a collective gives up after the group's 30 s timeout
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    results = [json.loads((tmp / f"rank{r}.json").read_text()) if (tmp / f"rank{r}.json").exists() else {}
               for r in range(2)]
    for r, result in enumerate(results):
        assert "crash" not in result, result["crash"]
        assert result, f"rank {r} wrote no result (exit code {procs[r].exitcode})"
    return tmp, results


def test_ranks_that_share_their_folders_pass(two_ranks):
    tmp, results = two_ranks
    assert results[0]["shared"] == results[1]["shared"] == ""
    assert len((tmp / "nfs" / "run" / MARKER).read_text()) == 32  # rank 0 created the run folder for its marker


def test_a_node_local_out_folder_is_the_same_error_on_both_ranks(two_ranks):
    tmp, results = two_ranks
    message = results[0]["local_out"]
    assert message == results[1]["local_out"] and "\n" not in message
    assert message.startswith("config key 'out': rank 1 (host ") and f"rank 0 wrote in {tmp / 'nfs' / 'run'}" in message
    assert str(tmp / "node1" / "run") in message


def test_a_trajectories_folder_missing_on_one_rank_is_the_same_error_on_both(two_ranks):
    tmp, results = two_ranks
    assert results[0]["missing_traj"] == results[1]["missing_traj"]
    assert results[0]["missing_traj"].startswith("config key 'trajectories': rank 1 (host ")
    assert results[0]["missing_traj"].endswith(f"cannot read {tmp / 'node1' / 'traj' / 'manifest.json'}")
    assert results[0]["other_traj"] == results[1]["other_traj"]
    assert "rank 1 (host " in results[0]["other_traj"] and "reads a different" in results[0]["other_traj"]


def test_work_done_once_on_rank_0_reaches_every_rank(two_ranks):
    _, results = two_ranks
    assert results[0]["from_rank0"] == results[1]["from_rank0"] == "rank 0's answer"
    assert results[0]["from_rank0_calls"] == [0] and results[1]["from_rank0_calls"] == []
    assert results[0]["from_rank0_error"] == results[1]["from_rank0_error"] == "config key 'model': rank 0 cannot read it"


def test_activation_tables_calibrated_on_rank_0_are_the_tables_of_every_rank(two_ranks):
    _, results = two_ranks
    tables = results[0]["tables"]
    assert tables == results[1]["tables"]
    assert tables["0.timesteps"] == [0.0, 400.0, 999.0] and len(tables["1.delta"]) == 1
    assert tables["0.delta"][0] < tables["0.delta"][1] < tables["0.delta"][2]  # calibrated, not the fresh [1.0]


def test_a_stale_deepspeed_build_lock_is_named_and_a_fresh_one_waited_for(tmp_path, monkeypatch, caplog):
    """A build killed mid-way leaves torch's FileBaton lock; the next run names it instead of waiting forever, and
    waits (saying so) while a live build holds one."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_locks() == []
    wait_for_build_locks()  # nothing to wait for
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(BuildLockError, match=f"{lock}.*60 min old.*delete it"):
        wait_for_build_locks(max_wait_s=600)
    assert lock.exists()  # named, not removed: another run could still hold it
    os.utime(lock)  # a live build: waited for until it goes
    threading.Timer(0.3, lock.unlink).start()
    t0 = time.time()
    wait_for_build_locks(max_wait_s=600, poll_s=0.05)
    assert 0.2 < time.time() - t0 < 5 and not lock.exists()
    assert "another process is building DeepSpeed's ops" in caplog.text
