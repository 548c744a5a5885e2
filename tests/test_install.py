"""A newcomer's install: a non-editable `pip install .` into a fresh venv, then every stage run as `qdistill ...`
from a folder outside the checkout, on the shipped bench teacher (found inside the installed package)."""
import json
import os
import subprocess
import sysconfig
import venv

import pytest

from conftest import REPO


def run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_install_runs_every_stage_outside_the_checkout(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (torch, DeepSpeed, diffusers, ...) come from the test environment's site-packages, appended
    # after the fresh venv's own: this installs and tests qdistill itself, not a second copy of torch.
    with open(os.path.join(site, "deps.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="2")
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(REPO)], tmp_path, env)

    work = tmp_path / "user"  # outside the checkout: nothing there but what the user writes
    work.mkdir()
    where = run([py, "-c", "import qdistill; print(qdistill.__file__)"], work, env)
    assert where.startswith(str(env_dir)), where  # the wheel's copy, not the checkout
    qdistill = str(env_dir / "bin" / "qdistill")
    assert "dilatequant" in run([qdistill, "configs"], work, env)
    run([qdistill, "calibrate", "--config", "calibrate", "out=traj", "num_samples=8", "steps=10", "every=2",
         "batch_size=4"], work, env)
    run([qdistill, "train", "--config", "demo", "trajectories=traj", "out=run", "distill.iterations=2",
         "distill.batch_size=4", "distill.init_rows=16", "distill.max_blocks=2", "distill.e2e_iterations=2",
         "quant.keep_sensitive_rows=16", "sampling.num_samples=2",
         "sampling.steps=5"], work, env)
    run([qdistill, "export", "run=run"], work, env)
    run([qdistill, "eval", "--config", "eval", "model=run/export", "num_samples=4", "steps=5", "batch_size=4",
         "fidelity_samples=2", "cache_dir=cache"], work, env)
    manifest = json.loads((work / "traj" / "manifest.json").read_text())
    assert manifest["num_rows"] == 8 * 5 and manifest["source_model"] == "assets/teacher"
    metrics = json.loads((work / "run" / "export" / "eval" / "metrics.json").read_text())
    assert metrics["bits"] == "W4A4" and metrics["mode"] == "integer" and metrics["fd"] > 0  # the shipped classifier
    assert 5 < metrics["psnr_db"] < 60
    # the DiT bench teacher ships in the wheel too
    run([qdistill, "calibrate", "--config", "calibrate", "model=assets/dit-teacher", "out=dit-traj", "num_samples=2",
         "steps=4", "every=2", "batch_size=2"], work, env)
    dit = json.loads((work / "dit-traj" / "manifest.json").read_text())
    assert dit["num_rows"] == 2 * 2 and dit["conditioning"] == "class"
    assert sorted(p.name for p in work.iterdir()) == ["cache", "dit-traj", "run", "traj"]
