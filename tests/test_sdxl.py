"""An SDXL-shaped pipeline (two text encoders, pooled embeddings and time_ids as added_cond_kwargs) through
calibrate → train → export with PTQD → eval, built and saved by the test."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, build_tiny_sdxl_pipeline, train_in_process
from qdistill.cli import main as qdistill


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    pipe = build_tiny_sdxl_pipeline(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("a red shoe\na blue bag\na photo of a dress\n")
    rc = qdistill(["calibrate", "--config", "calibrate", f"model={pipe}", f"out={root / 'traj'}", f"prompts={prompts}",
                   "guidance_scale=4.0", "scheduler=ddim", "num_samples=8", "batch_size=2", "steps=4", "every=2"])
    assert rc == 0
    return root, pipe, prompts


@pytest.mark.slow
def test_calibration_records_what_the_sdxl_pipeline_feeds_its_unet(sdxl):
    """Step 0 of seed 0's trajectory, recorded, against the inputs diffusers' own SDXL pipeline gives its UNet
    for the same prompt, latents and sampler: text embeddings, pooled embeddings, time_ids, x_t."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from qdistill.data.calibration_set import load_shards, read_manifest, to_model_inputs
    from qdistill.data.trajectories import latent_shape, seeded_noise

    root, pipe_dir, _ = sdxl
    manifest = read_manifest(root / "traj")
    assert manifest["format"] == 2 and manifest["conditioning"] == "text_time"
    assert {"text_embeds", "negative_text_embeds", "time_ids"} <= set(manifest["columns"])
    rows = load_shards(root / "traj")
    row = next(i for i in range(len(rows)) if int(rows[i]["sample_id"]) == 0 and int(rows[i]["step"]) == 0)
    ours = to_model_inputs(rows[row:row + 1])

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    pipe(prompt=["a red shoe"], latents=seeded_noise([0], latent_shape(pipe.unet)), num_inference_steps=4,
         guidance_scale=4.0, output_type="latent")
    args, theirs = seen[0]
    torch.testing.assert_close(ours["sample"], args[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"], rtol=1e-5, atol=1e-5)
    for key in ("text_embeds", "time_ids"):
        torch.testing.assert_close(ours["added_cond_kwargs"][key], theirs["added_cond_kwargs"][key].float(),
                                   rtol=1e-5, atol=1e-5)
    assert ours["added_cond_kwargs"]["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]  # 8 latents × VAE scale 2


@pytest.mark.slow
def test_sdxl_pipeline_trains_exports_with_ptqd_and_evaluates(sdxl):
    root, pipe, prompts = sdxl
    rc, log = train_in_process(["--config", str(REPO / "configs" / "dilatequant.yaml"), f"model={pipe}",
                                f"trajectories={root / 'traj'}", f"out={root / 'run'}", "distill.iterations=3",
                                "distill.batch_size=4", "distill.init_rows=16", "threads=1", "deepspeed=zero0.json"])
    assert rc == 0, log
    assert "attentions.0" in log
    assert qdistill(["export", f"run={root / 'run'}", "noise_correction=true", "measure.num_samples=4",
                     "measure.steps=4", "measure.batch_size=2"]) == 0
    export = root / "run" / "export"
    assert (export / "noise_correction.safetensors").is_file()
    assert qdistill(["eval", f"model={export}", f"reference={pipe}", f"prompts={prompts}", "guidance_scale=4.0",
                     "steps=4", "num_samples=4", "batch_size=2", "fidelity_samples=2", "mode=simulated",
                     f"out={root / 'eval'}", f"cache_dir={root / 'cache'}"]) == 0
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["ptqd_noise_correction"] is True
    assert 5 < metrics["psnr_db"] < 80 and len(metrics["noise_pred_mse_per_step"]) == 4
