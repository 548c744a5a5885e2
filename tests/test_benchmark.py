"""The benchmark harness (`python -m qdistill.bench.benchmark`) on a reduced setting: every recipe runs through the real `qdistill` stages, the table is
well formed, finished rows are not recomputed, and the table lands in the marked section of a Markdown file."""
import json

import pytest

from qdistill.bench.benchmark import Row, main as benchmark, rows_for
from qdistill.cli import main as qdistill


def test_extra_rows_add_ddpm_and_mixed_precision_rows():
    base = rows_for(["W4A8", "W4A4"], ["rtn", "qdiffusion", "ptqd", "dilatequant+ptqd"], extra_rows=False)
    assert [r.name for r in base] == ["fp-FP32-ddim", "rtn-W4A8-ddim", "qdiffusion-W4A8-ddim", "ptqd-W4A8-ddim",
                                      "dilatequant_ptqd-W4A8-ddim", "rtn-W4A4-ddim", "qdiffusion-W4A4-ddim",
                                      "ptqd-W4A4-ddim", "dilatequant_ptqd-W4A4-ddim"]
    extra = rows_for(["W4A8", "W4A4"], ["rtn", "qdiffusion", "ptqd", "dilatequant+ptqd"], extra_rows=True)
    assert extra[:len(base)] == base
    assert [r.name for r in extra[len(base):]] == ["fp-FP32-ddpm", "qdiffusion-W4A8-ddpm", "ptqd-W4A8-ddpm",
                                                   "dilatequant_ptqd-W4A4-ddim-mp", "dilatequant_ptqd-W4A4-ddim-mpw"]
    assert [r.base for r in extra[len(base) + 1:]] == ["qdiffusion", "qdiffusion", "dilatequant", "dilatequant"]
    assert Row("dilatequant+ptqd", "W4A4", mixed_precision=True, mixed_weights=True).ptqd
    # without W4A4 or the recipe, no mixed rows; without W4A8, the DDPM rows take the first bits
    assert [r.name for r in rows_for(["W8A8"], ["qdiffusion"], True)] == [
        "fp-FP32-ddim", "qdiffusion-W8A8-ddim", "fp-FP32-ddpm", "qdiffusion-W8A8-ddpm"]
    # keep_sensitive rows: rtn and dilatequant, each on a model of its own
    keep = rows_for(["W8A8"], ["rtn", "dilatequant", "dilatequant+ptqd"], False, keep_sensitive=True)
    assert [r.name for r in keep] == ["fp-FP32-ddim", "rtn-W8A8-ddim", "dilatequant-W8A8-ddim",
                                      "dilatequant_ptqd-W8A8-ddim", "rtn-W8A8-ddim-keep", "dilatequant-W8A8-ddim-keep"]
    assert keep[-1].model == "dilatequant-W8A8-keep" and keep[2].model == keep[3].model == "dilatequant-W8A8"
    # end-to-end rows: dilatequant per input kind, alone and with the sensitive layers kept, each its own model
    e2e = rows_for(["W8A8"], ["rtn", "dilatequant"], False, keep_sensitive=True, e2e_inputs=("fp", "quantized"))
    assert [r.name for r in e2e[len(keep) - 1:]] == [
        "dilatequant-W8A8-ddim-e2efp", "dilatequant-W8A8-ddim-keep-e2efp",
        "dilatequant-W8A8-ddim-e2equantized", "dilatequant-W8A8-ddim-keep-e2equantized"]
    assert [r.model for r in e2e[len(keep) - 1:len(keep) + 1]] == [
        "dilatequant-W8A8-e2efp", "dilatequant-W8A8-keep-e2efp"]
    assert rows_for(["W8A8"], ["rtn"], False, e2e_inputs=("fp",)) == rows_for(["W8A8"], ["rtn"], False)
    # outlier handling: the low-rank branch and group-wise weights alone and together (rtn and dilatequant), and
    # dilatequant with everything combined
    out = rows_for(["W4A4"], ["rtn", "dilatequant"], False, keep_sensitive=True, e2e_inputs=("fp",), low_rank=8,
                   group_size=16)
    assert [r.name for r in out[7:]] == [
        "rtn-W4A4-ddim-lr8", "dilatequant-W4A4-ddim-lr8", "rtn-W4A4-ddim-g16", "dilatequant-W4A4-ddim-g16",
        "rtn-W4A4-ddim-lr8-g16", "dilatequant-W4A4-ddim-lr8-g16", "dilatequant-W4A4-ddim-keep-lr8-g16-e2efp"]
    assert out[-1].quant_overrides == ["quant.keep_sensitive=auto", "quant.low_rank=8", "quant.weight_group_size=16"]
    assert out[-1].model == "dilatequant-W4A4-keep-lr8-g16-e2efp"
    # group-wise weights are for 4-bit weights: at W8A8 a group row would repeat the plain one
    assert rows_for(["W8A8"], ["rtn"], False, group_size=16) == rows_for(["W8A8"], ["rtn"], False)
    assert [r.name for r in rows_for(["W8A8", "W4A8"], ["rtn"], False, low_rank=2, group_size=16)] == [
        "fp-FP32-ddim", "rtn-W8A8-ddim", "rtn-W8A8-ddim-lr2", "rtn-W4A8-ddim", "rtn-W4A8-ddim-lr2",
        "rtn-W4A8-ddim-g16", "rtn-W4A8-ddim-lr2-g16"]


@pytest.mark.slow
def test_benchmark_reduced_setting_writes_a_well_formed_table_and_resumes(demo_pipeline_dir, tmp_path, capsys):
    traj = tmp_path / "traj"
    assert qdistill(["calibrate", "--config", "calibrate", f"model={demo_pipeline_dir}", f"out={traj}",
                     "num_samples=8", "steps=10", "batch_size=4", "every=2"]) == 0
    md = tmp_path / "BENCH.md"
    md.write_text("# notes\n<!-- benchmark:begin -->\nold table\n<!-- benchmark:end -->\ntail\n")
    args = [f"out={tmp_path / 'b'}", f"model={demo_pipeline_dir}", f"trajectories={traj}",
            f"classifier={tmp_path / 'no-classifier'}", "bits=[W4A8]", "recipes=[rtn,qdiffusion,ptqd]",
            "iterations=2", "num_samples=4", "steps=4",
            "fidelity_samples=2", "nc_samples=2", "mode=simulated", "extra_rows=false", f"update={md}",
            "sensitivity_top=2", "sensitivity_rows=8", "low_rank=2"]
    assert benchmark(args) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    # 3 recipes at W4A8 with DDIM: the quantize stage, a training, PTQD on that training's model (the dilatequant
    # rows run the same stages with other configs; the DDPM and mixed rows the same stages with other keys)
    assert sorted(results) == sorted(["rtn-W4A8-ddim", "qdiffusion-W4A8-ddim", "ptqd-W4A8-ddim", "rtn-W4A8-ddim-keep",
                                      "rtn-W4A8-ddim-lr2"])
    for name, r in results.items():
        assert r["psnr_db"] > 0 and r["calibration_seconds"] > 0 and r["peak_rss_mb"] > 100, name
        # W4A8 with the first/last convs and the time embedding at 8 bits: between all-W4A8 and all-W8A8
        assert r["export_bytes"] > 0 and 4 * 8 / (32 * 32) < r["relative_bops"], name
        assert r["relative_bops"] < 8 * 8 / (32 * 32) or name.endswith("-lr2"), name
        assert r["fd"] is None  # no classifier for a 3-channel 16×16 model: FD is left out, not made up
    # the low-rank row pays for its float branch in bit-operations and bytes
    lr, plain = results["rtn-W4A8-ddim-lr2"], results["rtn-W4A8-ddim"]
    assert lr["relative_bops"] > plain["relative_bops"] and lr["export_bytes"] > plain["export_bytes"]
    # a ptqd row shares its qdiffusion model but samples with the correction: different samples
    assert results["ptqd-W4A8-ddim"]["psnr_db"] != results["qdiffusion-W4A8-ddim"]["psnr_db"]
    assert results["ptqd-W4A8-ddim"]["calibration_seconds"] == results["qdiffusion-W4A8-ddim"]["calibration_seconds"]
    # each model's most sensitive units are measured and listed; the keep row names the layers it kept
    assert all(len(r["most_sensitive"]) == 2 for r in results.values())
    kept = results["rtn-W4A8-ddim-keep"]["kept_layers"]
    assert kept and results["rtn-W4A8-ddim"]["kept_layers"] is None
    table = (tmp_path / "b" / "benchmark.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| recipe")]
    assert len(rows) == 1 + len(results)  # plus the FP row
    assert all(line.count("|") == 12 for line in rows)
    assert f"`{kept[0]['name']}` at {kept[0]['to']}" in "\n".join(table)
    doc = md.read_text()
    assert "old table" not in doc and "| rtn | W4A8 | ddim |" in doc and doc.endswith("<!-- benchmark:end -->\ntail\n")

    # a rerun recomputes nothing (no stage runs), and other settings in the same folder are refused
    capsys.readouterr()
    assert benchmark(args) == 0
    assert "$ " not in capsys.readouterr().out
    assert benchmark([*args, "iterations=3"]) == 2
    assert "other settings" in capsys.readouterr().err

