"""On the shipped bench teacher at W4A4: block-wise distillation beats the RTN baseline (`qdistill quantize`)
block by block and on final samples. Short on purpose (20 iterations per block on 160 calibration rows); the full
recipe's numbers are in BENCHMARKS.md. Measured 2026-12-02: every block's held-out output MSE at least 1.26x below
RTN's, PSNR vs FP 17.9 dB against RTN's 13.4 dB."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, train_in_process
from qdistill.cli import main as qdistill

TEACHER = REPO / "assets" / "teacher"
SAMPLING = ["sampling.num_samples=8", "sampling.steps=20"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-distill")
    common = ["calibrate", "--config", "calibrate", f"model={TEACHER}", "steps=20", "every=2", "batch_size=16"]
    assert qdistill([*common, f"out={root / 'traj'}", "num_samples=16"]) == 0
    assert qdistill([*common, f"out={root / 'held-out'}", "num_samples=16", "seed=5000"]) == 0
    assert qdistill([
        "quantize", "--config", "rtn", f"model={TEACHER}", f"out={root / 'rtn'}",
        "quant.weight_bits=4", "quant.act_bits=4", "calibration.num_samples=16", "calibration.steps=20",
        "calibration.every=2", *SAMPLING]) == 0
    rc, log = train_in_process(["--config", "dilatequant", f"model={TEACHER}",
                                f"trajectories={root / 'traj'}", f"out={root / 'bkd'}", "deepspeed=zero0.json",
                                "distill.iterations=20", "distill.batch_size=16", "distill.init_rows=160", *SAMPLING])
    assert rc == 0, log
    return root


def test_distillation_beats_rtn_on_every_block_and_on_samples(runs):
    from qdistill.data.calibration_set import load_shards, to_model_inputs
    from qdistill.data.model_folder import load_denoiser
    from qdistill.evaluation.fidelity import block_output_mse
    from qdistill.quantizers import find_blocks
    from qdistill.export import load_quantized

    fp = load_denoiser(TEACHER).eval()
    rtn, bkd = load_quantized(runs / "rtn" / "quantized"), load_quantized(runs / "bkd" / "quantized")
    held_out = load_shards(runs / "held-out")
    batches = [to_model_inputs(held_out[a:a + 40]) for a in range(0, len(held_out), 40)]
    example = {k: v[:2] for k, v in batches[0].items()}
    blocks_fp = find_blocks(fp, example)
    mse_rtn = block_output_mse(fp, rtn, blocks_fp, find_blocks(rtn, example), batches)
    mse_bkd = block_output_mse(fp, bkd, blocks_fp, find_blocks(bkd, example), batches)
    assert len(mse_bkd) == len(blocks_fp) >= 20
    worse = {name: (mse_bkd[name], mse_rtn[name]) for name in mse_bkd if not mse_bkd[name] < mse_rtn[name]}
    assert not worse, f"blocks where distillation is not better than RTN (bkd, rtn): {worse}"

    psnr_rtn = json.loads((runs / "rtn" / "metrics.json").read_text())["psnr_db"]
    psnr_bkd = json.loads((runs / "bkd" / "metrics.json").read_text())["psnr_db"]
    assert psnr_bkd > psnr_rtn + 1.0, (psnr_bkd, psnr_rtn)
