"""`qdistill benchmark` on a reduced setting: every recipe runs through the real `qdistill` stages, the table is
well formed, finished rows are not recomputed, and the table lands in the marked section of a Markdown file."""
import json

import pytest

from qdistill.cli import main as qdistill


@pytest.mark.slow
def test_benchmark_reduced_setting_writes_a_well_formed_table_and_resumes(demo_pipeline_dir, tmp_path, capsys):
    traj = tmp_path / "traj"
    assert qdistill(["calibrate", "--config", "calibrate", f"model={demo_pipeline_dir}", f"out={traj}",
                     "num_samples=8", "num_steps=10", "batch_size=4", "every=2"]) == 0
    md = tmp_path / "BENCH.md"
    md.write_text("# notes\n<!-- benchmark:begin -->\nold table\n<!-- benchmark:end -->\ntail\n")
    args = ["benchmark", f"out={tmp_path / 'b'}", f"model={demo_pipeline_dir}", f"trajectories={traj}",
            f"classifier={tmp_path / 'no-classifier'}", "bits=[W4A8]", "recipes=[rtn,qdiffusion,ptqd]",
            "iterations=2", "num_samples=4", "steps=4",
            "fidelity_samples=2", "nc_samples=2", "mode=simulated", f"update={md}"]
    assert qdistill(args) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    # 3 recipes at W4A8 with DDIM (the quantize stage, a training, PTQD on that training's model; the dilatequant
    # rows run the same stages with other configs), then qdiffusion and ptqd with DDPM (no W4A4: no mixed rows)
    assert sorted(results) == sorted(["rtn-W4A8-ddim", "qdiffusion-W4A8-ddim", "ptqd-W4A8-ddim",
                                      "qdiffusion-W4A8-ddpm", "ptqd-W4A8-ddpm"])
    for name, r in results.items():
        assert r["psnr_db"] > 0 and r["calibration_seconds"] > 0 and r["peak_rss_mb"] > 100, name
        # W4A8 with the first/last convs and the time embedding at 8 bits: between all-W4A8 and all-W8A8
        assert r["export_bytes"] > 0 and 4 * 8 / (32 * 32) < r["relative_bops"] < 8 * 8 / (32 * 32), name
        assert r["fd"] is None  # no classifier for a 3-channel 16×16 model: FD is left out, not made up
    # a ptqd row shares its qdiffusion model but samples with the correction: different samples
    assert results["ptqd-W4A8-ddim"]["psnr_db"] != results["qdiffusion-W4A8-ddim"]["psnr_db"]
    assert results["ptqd-W4A8-ddim"]["calibration_seconds"] == results["qdiffusion-W4A8-ddim"]["calibration_seconds"]
    table = (tmp_path / "b" / "benchmark.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| recipe")]
    assert len(rows) == 2 + len(results)  # plus the FP rows (DDIM and DDPM)
    assert all(line.count("|") == 11 for line in rows)
    doc = md.read_text()
    assert "old table" not in doc and "| rtn | W4A8 | ddim |" in doc and doc.endswith("<!-- benchmark:end -->\ntail\n")

    # a rerun recomputes nothing (no stage runs), and other settings in the same folder are refused
    capsys.readouterr()
    assert qdistill(args) == 0
    assert "$ " not in capsys.readouterr().out
    assert qdistill([*args, "iterations=3"]) == 2
    assert "other settings" in capsys.readouterr().err
