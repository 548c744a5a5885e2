"""Diffusion transformers (DiT, PixArt, SD3, Flux) through quantize_ / fit_ranges_: the forward's own signature,
transformer blocks, attention quantized inside each family's own processor, layer roles."""
import copy

import pytest
import torch
from torch import nn

from conftest import TRANSFORMER_CONFIGS, build_transformer
from qdistill.configs import load_config
from qdistill.configs.schema import TrajectoryConfig
from qdistill.data.calibration import record_calibration_set
from qdistill.data.calibration_set import load_shards, to_model_inputs
from qdistill.data.model_folder import load_denoiser
from qdistill.denoisers import bound_inputs, example_inputs, latent_name, noise_prediction, num_classes
from qdistill.quantizers import QuantConfig, TemporalQuantizer, block_output, fit_ranges_, find_blocks, quantize_, \
    set_quantization
from qdistill.quantizers.attention import QuantAttnProcessor
from qdistill.quantizers.layer_precision import assign_layer_bits, layer_roles
from qdistill.quantizers.sdpa_attention import QuantSDPA

FAMILIES = list(TRANSFORMER_CONFIGS)
# the input and output layers and the conditioning embedders, by role, in each family
ROLES = {
    "dit": ("pos_embed.proj", "proj_out_2", {"proj_out_1", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"}),
    "pixart": ("pos_embed.proj", "proj_out", {"adaln_single.linear", "caption_projection.linear_1",
                                              "adaln_single.emb.timestep_embedder.linear_2"}),
    "sd3": ("pos_embed.proj", "proj_out", {"context_embedder", "time_text_embed.text_embedder.linear_1",
                                           "time_text_embed.timestep_embedder.linear_1"}),
    "flux": ("x_embedder", "proj_out", {"context_embedder", "time_text_embed.guidance_embedder.linear_2",
                                        "time_text_embed.timestep_embedder.linear_1"}),
}
BLOCKS = {  # the transformer blocks (and patch embedding) found, by what they are
    "dit": ["pos_embed", "transformer_blocks.0", "transformer_blocks.1"],
    "pixart": ["pos_embed", "transformer_blocks.0", "transformer_blocks.1"],
    "sd3": ["pos_embed", "transformer_blocks.0", "transformer_blocks.1"],
    "flux": ["x_embedder", "transformer_blocks.0", "single_transformer_blocks.0"],
}


def mixed_timesteps(model, kw, values=(900.0, 100.0)):
    scale = 1000 if "img_ids" in kw else 1  # Flux takes σ = t / 1000
    return {**kw, "timestep": torch.tensor(values) / scale}


@pytest.mark.parametrize("family", FAMILIES)
def test_quantization_off_is_exact_and_on_changes_the_prediction(family):
    fp = build_transformer(family)
    kw = mixed_timesteps(fp, example_inputs(fp, 2))
    ref = noise_prediction(fp(**kw))
    q = quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=4, act_bits=8))
    set_quantization(q, weights=False, activations=False)
    torch.testing.assert_close(noise_prediction(q(**kw)), ref, rtol=1e-5, atol=2e-6)  # Weight Dilation: exact math
    set_quantization(q, weights=True, activations=True)
    fit_ranges_(q, [kw])
    err = (noise_prediction(q(**kw)) - ref).pow(2).mean() / ref.pow(2).mean()
    assert 1e-6 < err < 0.05, err  # quantized, and still the same function


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_quantized_inside_the_familys_own_processor(family):
    fp = build_transformer(family)
    kw = mixed_timesteps(fp, example_inputs(fp, 2))
    processors = {type(m.processor) for m in fp.modules() if hasattr(m, "processor")}
    q = quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8))
    wrapped = [m for m in q.modules() if isinstance(m, QuantSDPA)]
    plain = [m for m in q.modules() if isinstance(m, QuantAttnProcessor)]
    attention = [m for m in q.modules() if hasattr(m, "processor")]
    assert len(wrapped) + len(plain) == len(attention) > 0
    if family in ("sd3", "flux"):  # joint attention / RoPE: the processor is kept, its SDPA calls are caught
        assert len(wrapped) == len(attention)
        assert {type(m.processor) for m in q.modules() if hasattr(m, "processor")} == processors
    fit_ranges_(q, [kw])
    for m in wrapped + plain:  # every attention quantizer saw the calls and holds a calibrated row per timestep
        for quantizer in (m.q_quantizer, m.k_quantizer, m.v_quantizer, m.probs_quantizer):
            assert quantizer.timesteps.numel() == 2 and bool((quantizer.delta > 0).all())
    # only the attention quantizers on: the prediction moves (they are in the computation), and with them off
    # too the wrapped model equals the FP one
    set_quantization(q, weights=False, activations=False)
    for m in wrapped + plain:
        for quantizer in (m.q_quantizer, m.k_quantizer, m.v_quantizer, m.probs_quantizer):
            quantizer.enabled = True
    ref = noise_prediction(fp(**kw))
    assert (noise_prediction(q(**kw)) - ref).abs().max() > 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_blocks_are_found_and_run_once_per_forward(family):
    model = build_transformer(family)
    kw = example_inputs(model, 2)
    blocks = find_blocks(model, kw)
    names = [b.name for b in blocks]
    assert [n for n in names if n in BLOCKS[family]] == BLOCKS[family]
    assert names[-1] == ROLES[family][1]  # the output head is the last block
    owners = {}
    for block in blocks:  # every layer in exactly one block
        for sub in block.module.modules():
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                assert id(sub) not in owners
                owners[id(sub)] = block.name
    assert len(owners) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    calls = {b.name: 0 for b in blocks}
    hooks = [b.module.register_forward_hook(lambda m, a, o, n=b.name: calls.__setitem__(n, calls[n] + 1))
             for b in blocks]
    model(**kw)
    for h in hooks:
        h.remove()
    assert set(calls.values()) == {1}, calls


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_joint_blocks_target_covers_both_streams(family):
    model = build_transformer(family)
    seen = {}
    block = model.transformer_blocks[0]
    block.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    model(**example_inputs(model, 2))
    text, image = seen["out"]
    target = block_output(seen["out"])
    assert target.shape == (2, text[0].numel() + image[0].numel())
    torch.testing.assert_close(target[:, :text[0].numel()], text.flatten(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_roles_and_first_last_rules(family):
    model = build_transformer(family)
    first, last, embedders = ROLES[family]
    roles = layer_roles(model)
    assert [n for n, r in roles.items() if r == "input"] == [first]
    assert [n for n, r in roles.items() if r == "output"] == [last]
    assert embedders <= {n for n, r in roles.items() if r == "embedding"}
    assert not any(r == "embedding" for n, r in roles.items() if ".attn" in n or ".ff" in n)
    bits = assign_layer_bits(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits=None,
                                                time_embedding_bits=8))
    assert bits[first] is None and bits[last] is None
    assert all(bits[n] == (8, 8) for n in embedders)
    assert sum(b == (4, 4) for b in bits.values()) > len(bits) // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_keyword_positional_and_scalar_timestep_forwards(family):
    fp = build_transformer(family)
    kw = example_inputs(fp, 2)
    q = quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8))
    fit_ranges_(q, [kw])
    by_keyword = noise_prediction(q(**kw))
    name = latent_name(q)
    rest = {k: v for k, v in kw.items() if k != name}
    torch.testing.assert_close(noise_prediction(q(kw[name], **rest)), by_keyword)  # latent by position
    if family != "pixart":  # one timestep for the whole batch (PixArt's own forward needs one per sample)
        single = {**kw, "timestep": kw["timestep"][:1]}
        torch.testing.assert_close(noise_prediction(q(**single)), by_keyword)
    with pytest.raises(ValueError, match="without a timestep"):
        q(**{k: v for k, v in kw.items() if k != "timestep"})
    tables = [m for m in q.modules() if isinstance(m, TemporalQuantizer)]
    assert tables and all(m.timesteps.numel() == 1 for m in tables)


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    """A tiny class-conditional DiT pipeline folder (transformer/, vae/, scheduler/), saved by diffusers."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8,), norm_num_groups=8,
                        sample_size=8)
    DiTPipeline(transformer=build_transformer("dit"), vae=vae, scheduler=DDIMScheduler()).save_pretrained(root / "pipe")
    from qdistill.cli import main as qdistill

    assert qdistill(["calibrate", "--config", "calibrate", f"model={root / 'pipe'}", f"out={root / 'traj'}",
                     "num_samples=4", "batch_size=2", "steps=10", "every=2"]) == 0
    return root


def test_a_dit_pipeline_runs_calibrate_train_export_eval(dit_pipeline):
    """Every stage on a DiT pipeline folder: class labels recorded, the transformer blocks distilled, the export
    loads in integer mode and eval samples it against the FP model, with the learned-variance channels dropped as
    diffusers' DiTPipeline drops them."""
    import json

    from conftest import REPO, train_in_process
    from qdistill.cli import main as qdistill

    root, pipe = dit_pipeline, dit_pipeline / "pipe"
    manifest = json.loads((root / "traj" / "manifest.json").read_text())
    assert manifest["conditioning"] == "class" and manifest["model_class"] == "DiTTransformer2DModel"
    assert manifest["shapes"]["x_t"] == [4, 8, 8] and "class_label" in manifest["columns"]
    rc, log = train_in_process(["--config", str(REPO / "configs" / "dilatequant.yaml"), f"model={pipe}",
                                f"trajectories={root / 'traj'}", f"out={root / 'run'}", "quant.weight_bits=8",
                                "quant.act_bits=8", "distill.iterations=4", "distill.batch_size=4",
                                "distill.init_rows=16", "distill.eval_every=2", "sampling.num_samples=4",
                                "sampling.steps=10", "threads=1"])
    assert rc == 0, log
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    trained = [b["block"] for b in metrics["blocks"]]
    assert "transformer_blocks.0" in trained and "pos_embed" in trained and trained[-1] == "proj_out_2"
    assert qdistill(["export", f"run={root / 'run'}", f"out={root / 'export'}"]) == 0
    assert qdistill(["eval", f"model={root / 'export'}", f"reference={pipe}", "num_samples=4", "batch_size=2",
                     "steps=10", "fidelity_samples=2", f"out={root / 'eval'}", f"cache_dir={root / 'cache'}"]) == 0
    result = json.loads((root / "eval" / "metrics.json").read_text())
    assert result["psnr_db"] > 20, result  # W8A8 after a few iterations: close to FP
    # the train stage's FP | quantized comparison samples each seed's label, as eval does
    assert metrics["psnr_db"] > 15 and (root / "run" / "samples.png").is_file(), metrics


def test_a_dit_runs_the_rtn_and_ptqd_baselines(dit_pipeline):
    """The benchmark's other recipes on a class-conditional DiT: `qdistill quantize --config rtn` records its own
    labelled trajectories, calibrates and compares with FP; PTQD's export measures its correction on labelled
    trajectories, and eval samples with it."""
    import json

    from conftest import REPO, train_in_process
    from qdistill.cli import main as qdistill

    root, pipe = dit_pipeline, dit_pipeline / "pipe"
    assert qdistill(["quantize", "--config", "rtn", f"model={pipe}", f"out={root / 'rtn'}", "quant.weight_bits=8",
                     "calibration.num_samples=4", "calibration.steps=10", "calibration.every=2",
                     "sampling.num_samples=2", "sampling.steps=10", "quant.keep_sensitive=auto",
                     "quant.keep_sensitive_rows=8"]) == 0
    rtn = json.loads((root / "rtn" / "metrics.json").read_text())
    assert rtn["psnr_db"] > 20, rtn  # W8A8 RTN on labelled inputs: close to FP
    run = root / "ptqd-run"
    rc, log = train_in_process(["--config", str(REPO / "configs" / "dilatequant.yaml"), f"model={pipe}",
                                f"trajectories={root / 'traj'}", f"out={run}", "quant.weight_bits=4",
                                "quant.act_bits=8", "distill.iterations=2", "distill.batch_size=4",
                                "distill.init_rows=16", "threads=1"])
    assert rc == 0, log
    assert qdistill(["export", "--config", "dilatequant+ptqd", f"run={run}", f"out={root / 'ptqd'}",
                     "measure.num_samples=4", "measure.steps=10", "measure.batch_size=2"]) == 0
    meta = json.loads((root / "ptqd" / "quant_config.json").read_text())
    assert "noise_correction" in json.dumps(meta)
    assert qdistill(["eval", f"model={root / 'ptqd'}", f"reference={pipe}", "num_samples=2", "batch_size=2",
                     "steps=10", "fidelity_samples=2", f"out={root / 'ptqd-eval'}", f"cache_dir={root / 'cache'}"]) == 0
    result = json.loads((root / "ptqd-eval" / "metrics.json").read_text())
    assert result["psnr_db"] > 10, result


def test_a_flow_matching_scheduler_is_refused_not_converted(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qdistill.data.model_folder import ModelFolderError, load_scheduler

    build_transformer("sd3").save_pretrained(tmp_path / "transformer")
    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(ModelFolderError, match="flow-matching scheduler.*scheduler=own"):
        load_scheduler(tmp_path, "ddim")
    assert type(load_scheduler(tmp_path, "own")) is FlowMatchEulerDiscreteScheduler


def test_two_ranks_distill_the_dit_as_one_rank_does(dit_pipeline):
    """torchrun with 2 ranks (DeepSpeed ZeRO 2, gloo) against one rank (ZeRO 0) on the DiT's transformer blocks."""
    from conftest import REPO, launch, train_in_process, trained_state
    from test_distill import assert_same_training, initial_state

    root = dit_pipeline
    args = ["--config", str(REPO / "configs" / "dilatequant.yaml"), f"model={root / 'pipe'}",
            f"trajectories={root / 'traj'}", "quant.weight_bits=4", "quant.act_bits=8", "distill.iterations=4",
            "distill.batch_size=4", "distill.init_rows=16", "distill.checkpoint_every=2", "distill.keep_best=false",
            "distill.lr_weights=1e-3", "distill.lr_quant=1e-3", "distill.block_input=fp", "threads=1"]
    rc, log = train_in_process([*args, f"out={root / 'one'}", "deepspeed=zero0.json"])
    assert rc == 0, log
    rc, log = launch([*args, f"out={root / 'two'}", "deepspeed=zero2.json"], nproc=2)
    assert rc == 0, log
    assert "transformer_blocks.1" in log
    assert_same_training(trained_state(root / "two"), trained_state(root / "one"),
                         initial_state([*args, f"out={root / 'one'}"]))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_flow_matching_sampler_equals_the_diffusers_pipeline(family):
    """run_sampler (what calibration, fidelity and eval sample with) against StableDiffusion3Pipeline (shift 3,
    classifier-free guidance) and FluxPipeline (dynamic shifting, packed latents, distilled guidance), on the same
    seeded latents and text embeddings."""
    import diffusers

    from qdistill.data.trajectories import Conditioning, latent_shape, run_sampler, seeded_noise

    model = build_transformer(family)
    g = torch.Generator().manual_seed(5)
    emb, neg, pooled, neg_pooled = (torch.randn(2, *s, generator=g) for s in ((8, 12), (8, 12), (10,), (10,)))
    none = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if family == "sd3":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = diffusers.StableDiffusion3Pipeline(transformer=model, scheduler=scheduler, text_encoder_3=None,
                                                  tokenizer_3=None, **none)
        noise = seeded_noise([0, 1], latent_shape(model))
        theirs = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                      negative_pooled_prompt_embeds=neg_pooled, guidance_scale=4.0, latents=noise,
                      num_inference_steps=4, output_type="latent", height=64, width=64).images
        cond = Conditioning(encoder_hidden_states=emb, negative_encoder_hidden_states=neg, guidance_scale=4.0,
                            pooled_projections=pooled, negative_pooled_projections=neg_pooled)
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                              max_image_seq_len=64)
        pipe = diffusers.FluxPipeline(transformer=model, scheduler=scheduler, **none)
        noise = seeded_noise([0, 1], latent_shape(model, 8))  # 4×4 packed tokens: 64 px at the VAE's 8×
        theirs = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, guidance_scale=3.5, latents=noise,
                      num_inference_steps=4, output_type="latent", height=64, width=64).images
        cond = Conditioning(encoder_hidden_states=emb, pooled_projections=pooled, guidance=torch.full((2,), 3.5))
    ours = run_sampler(model, diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler.config), noise, 4,
                       cond=cond)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_integer_mode_runs_the_transformers_linears_on_int8_kernels(family):
    """W8A8: every quantized Linear on oneDNN's int8 kernel with its timestep's rows; the whole model within 2 % of
    simulated mode (the tolerance the UNets are held to). Every family's attention is in integer mode: DiT/PixArt
    through qdistill's processor, SD3/Flux through the SDPA calls of their own processors."""
    from qdistill.quantizers.integer_layers import to_integer

    fp = build_transformer(family)
    kw = mixed_timesteps(fp, example_inputs(fp, 2))
    q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8)), [kw])
    simulated = noise_prediction(q(**kw))
    with torch.no_grad():
        report = to_integer(q)
        integer = noise_prediction(q(**kw))
    linears = [n for n, m in fp.named_modules() if isinstance(m, nn.Linear)]
    assert set(linears) <= set(report["integer"]), set(linears) - set(report["integer"])
    attention = [n for n, m in q.named_modules() if hasattr(m, "processor")]
    assert sorted(report["attention"]) == sorted(attention) and attention
    err = (integer - simulated).pow(2).mean().sqrt() / simulated.pow(2).mean().sqrt()
    assert err < 0.02, err


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_integer_attention_under_the_familys_own_processor_runs_on_codes(family, monkeypatch):
    """One timestep per batch (how sampling calls the model): in integer mode every attention module's SDPA call
    takes the codes path (softmax on the probabilities' codes, a few heads at a time), and the model's output
    equals the same integer model with simulated attention within float rounding."""
    from qdistill.quantizers import integer_attention
    from qdistill.quantizers.integer_layers import to_integer

    fp = build_transformer(family)
    kw = example_inputs(fp, 2)  # one timestep for the batch
    q = fit_ranges_(quantize_(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8)), [kw])
    wrapped = [m for m in q.modules() if isinstance(m, QuantSDPA)]
    taken = []
    real_attend = integer_attention.attend
    monkeypatch.setattr(integer_attention, "attend", lambda *a: taken.append(out := real_attend(*a)) or out)
    with torch.no_grad():
        to_integer(q, linear_kernel="onednn")
        for m in wrapped:
            m.integer = False
        simulated = noise_prediction(q(**kw))
        assert not taken
        for m in wrapped:
            m.integer = True
        integer = noise_prediction(q(**kw))
        for m in wrapped:
            m.probs_quantizer.enabled = False
        unquantized_probs = noise_prediction(q(**kw))
    assert len(taken) >= len(wrapped) > 0 and all(out is not None for out in taken[:len(wrapped)])
    torch.testing.assert_close(integer, simulated, rtol=1e-4, atol=1e-5)
    assert (unquantized_probs - integer).abs().max() > 1e-6  # the probabilities' quantizer is in the computation


def test_quant_sdpa_integer_path_equals_simulated_with_a_mask():
    """The integer path broadcasts a boolean key mask over batch and heads like SDPA does, and its result is the
    simulated path's within float rounding; a masked key gets no probability in either."""
    import torch.nn.functional as F

    class Attend(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    attend = Attend()
    sdpa = QuantSDPA(8, per_timestep=False)
    with torch.no_grad():
        for quantizer in (sdpa.q_quantizer, sdpa.k_quantizer, sdpa.v_quantizer):
            quantizer.delta.fill_(0.03), quantizer.zero.fill_(128)
        sdpa.probs_quantizer.delta.fill_(1 / 255), sdpa.probs_quantizer.zero.fill_(0)
    sdpa.install(attend)
    with torch.no_grad():
        simulated = attend(q, k, v, mask)
        sdpa.integer = True
        integer = attend(q, k, v, mask)
        v_masked = v.clone()
        v_masked[1, :, 3:] = 1e3  # values behind masked keys must not reach the output
        assert torch.equal(attend(q, k, v_masked, mask)[1], integer[1])
    torch.testing.assert_close(integer, simulated, rtol=1e-5, atol=1e-6)
    assert (integer - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() > 1e-4  # quantized


@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory):
    """A tiny StableDiffusion3Pipeline folder: two CLIP text encoders with projections (no T5: SD3 runs without it,
    its part of the embeddings zeros), the tiny SD3 transformer, a flow-matching scheduler with shift 3."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from conftest import _tiny_tokenizer

    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(root / "_tokenizer_src")
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=6, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=16, projection_dim=5, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
        for _ in range(2)]  # hidden 6 + 6 = the transformer's joint_attention_dim, pooled 5 + 5 its pooled dim
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=8,
                        scaling_factor=1.5305, shift_factor=0.0609)  # an SD3 VAE has both
    StableDiffusion3Pipeline(transformer=build_transformer("sd3"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                             tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None).save_pretrained(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("a red shoe\na blue bag\na photo of a dress\n")
    from qdistill.cli import main as qdistill

    assert qdistill(["calibrate", "--config", "calibrate", f"model={root / 'pipe'}", f"out={root / 'traj'}",
                     f"prompts={prompts}", "guidance_scale=4.0", "scheduler=own", "num_samples=4", "batch_size=2",
                     "steps=4", "every=2"]) == 0
    return root


def _tiny_t5(folder, d_model: int):
    """A T5 encoder and a fast Unigram tokenizer over a hand-made vocabulary (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = ["a", "photo", "of", "red", "blue", "shoe", "bag", "dress"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words] + \
        [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(folder)  # a saved and reloaded tokenizer, as pipelines load it
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=4, d_ff=16, num_layers=1,
                                      num_heads=2)).eval()
    return T5TokenizerFast.from_pretrained(folder), encoder


@pytest.fixture(scope="module", params=["pixart", "flux"])
def t5_pipeline(request, tmp_path_factory):
    """A tiny PixArt-α pipeline (T5, caption masks, learned variance, DDIM) or Flux pipeline (CLIP pooled + T5,
    packed latents, distilled guidance, dynamic shifting), calibrated from its folder at a 16×16 latent
    (`sample_size`; the model's default would be 8 for this PixArt, 64 for Flux)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from conftest import _tiny_tokenizer
    from qdistill.cli import main as qdistill

    family, root = request.param, tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    transformer = build_transformer(family)
    t5_tokenizer, t5 = _tiny_t5(root / "_t5", 12)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159)
    if family == "pixart":
        pipe = diffusers.PixArtAlphaPipeline(tokenizer=t5_tokenizer, text_encoder=t5, vae=vae, transformer=transformer,
                                             scheduler=diffusers.DDIMScheduler())
        guidance, scheduler = "guidance_scale=4.0", "scheduler=ddim"
    else:
        clip_tokenizer = _tiny_tokenizer(root / "_clip")
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=10, intermediate_size=16,
                                            num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=77,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
        clip_tokenizer.model_max_length = 77
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                              max_image_seq_len=64)
        pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                                      text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
        guidance, scheduler = "guidance_scale=3.5", "scheduler=own"
    pipe.save_pretrained(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("a red shoe\na blue bag\na photo of a dress\n")
    assert qdistill(["calibrate", "--config", "calibrate", f"model={root / 'pipe'}", f"out={root / 'traj'}",
                     f"prompts={prompts}", guidance, scheduler, "num_samples=4", "batch_size=2", "steps=4",
                     "every=2", f"sample_size={SIZE}"]) == 0
    return family, root


SIZE = 16  # the t5 pipelines' calibration and eval latent size


def test_calibration_records_what_pixart_and_flux_pipelines_feed_their_transformer(t5_pipeline):
    """Step 0 of seed 0 against the pipeline's own call for the same prompt and latents: PixArt's guidance batch of
    T5 embeddings and caption masks; Flux's packed latents, σ timestep, pooled CLIP projection, token positions
    and distilled guidance."""
    from qdistill.data.calibration_set import read_manifest
    from qdistill.data.model_folder import load_pipeline
    from qdistill.data.trajectories import latent_shape, seeded_noise

    family, root = t5_pipeline
    assert read_manifest(root / "traj")["sample_size"] == SIZE
    pipe = load_pipeline(root / "pipe")
    rows = load_shards(root / "traj")
    row = next(i for i in range(len(rows)) if int(rows[i]["sample_id"]) == 0 and int(rows[i]["step"]) == 0)
    ours = to_model_inputs(rows[row:row + 1], pipe.transformer)
    seen = []  # the call's inputs by name (PixArt's pipeline passes the latent by position)
    pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(bound_inputs(m, args, kwargs)),
                                               with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    noise = seeded_noise([0], latent_shape(pipe.transformer, SIZE))  # 16 latents: 16 px with this one-level VAE
    assert noise.shape[1:] == ((64, 16) if family == "flux" else (4, 16, 16))  # Flux packs 2×2 latents per token
    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    pipe(prompt=["a red shoe"], latents=noise, num_inference_steps=4, guidance_scale=4.0 if family == "pixart" else 3.5,
         output_type="latent", height=SIZE, width=SIZE, **extra)
    theirs = seen[0]
    keys = ["hidden_states", "timestep", "encoder_hidden_states"] + (
        ["encoder_attention_mask"] if family == "pixart" else ["pooled_projections", "guidance", "img_ids", "txt_ids"])
    for key in keys:
        torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=1e-5, atol=1e-5, msg=key)


def test_calibration_records_what_the_sd3_pipeline_feeds_its_transformer(sd3_pipeline):
    """Step 0 of seed 0, recorded from the SD3 folder with its own flow-matching scheduler, against the inputs
    StableDiffusion3Pipeline gives its transformer for the same prompt, latents and guidance: the guidance batch
    [negative, prompt] of text embeddings and pooled projections, x_t and the timestep."""
    from qdistill.data.calibration_set import read_manifest
    from qdistill.data.model_folder import load_pipeline
    from qdistill.data.trajectories import latent_shape, seeded_noise

    root = sd3_pipeline
    manifest = read_manifest(root / "traj")
    assert manifest["conditioning"] == "text" and manifest["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
    assert {"pooled_projections", "negative_pooled_projections"} <= set(manifest["columns"])
    pipe = load_pipeline(root / "pipe")
    rows = load_shards(root / "traj")
    row = next(i for i in range(len(rows)) if int(rows[i]["sample_id"]) == 0 and int(rows[i]["step"]) == 0)
    ours = to_model_inputs(rows[row:row + 1], pipe.transformer)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=["a red shoe"], latents=seeded_noise([0], latent_shape(pipe.transformer)), num_inference_steps=4,
         guidance_scale=4.0, output_type="latent", height=64, width=64)
    theirs = seen[0]
    for key in ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"):
        torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=1e-5, atol=1e-5, msg=key)


def test_an_sd3_pipeline_trains_on_its_recorded_text_conditioning(sd3_pipeline):
    from conftest import REPO, train_in_process

    root = sd3_pipeline
    rc, log = train_in_process(["--config", str(REPO / "configs" / "dilatequant.yaml"), f"model={root / 'pipe'}",
                                f"trajectories={root / 'traj'}", f"out={root / 'run'}", "quant.weight_bits=8",
                                "quant.act_bits=8", "distill.iterations=2", "distill.batch_size=4",
                                "distill.init_rows=8", "threads=1"])
    assert rc == 0, log
    assert "transformer_blocks.1" in log and "conditional model" in log
    from qdistill.cli import main as qdistill

    assert qdistill(["export", f"run={root / 'run'}", f"out={root / 'export'}"]) == 0
    assert qdistill(["eval", f"model={root / 'export'}", f"reference={root / 'pipe'}", f"prompts={root / 'prompts.txt'}",
                     "guidance_scale=4.0", "scheduler=own", "num_samples=2", "batch_size=2", "steps=4",
                     "fidelity_samples=2", f"out={root / 'eval'}", f"cache_dir={root / 'cache'}"]) == 0
    import json

    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["psnr_db"] > 15, metrics  # through StableDiffusion3Pipeline with its VAE, W8A8 against FP
    # PTQD's correction is not derived for flow matching: refused by name, nothing written
    assert qdistill(["export", "--config", "ptqd", f"run={root / 'run'}", f"out={root / 'ptqd'}"]) == 2
    assert not (root / "ptqd").exists()


def test_pixart_and_flux_pipelines_train_export_and_eval_through_their_pipelines(t5_pipeline):
    """PixArt-α (T5 embeddings and caption masks, learned variance, DDIM) and Flux (packed latents, σ timesteps,
    pooled CLIP, token ids, distilled guidance, its own flow-matching scheduler): calibrate (the fixture) → train
    → export → eval, where eval samples the export and the FP model through the family's own diffusers pipeline
    on the same seeds."""
    import json

    from conftest import REPO, train_in_process
    from qdistill.cli import main as qdistill

    family, root = t5_pipeline
    rc, log = train_in_process(["--config", str(REPO / "configs" / "dilatequant.yaml"), f"model={root / 'pipe'}",
                                f"trajectories={root / 'traj'}", f"out={root / 'run'}", "quant.weight_bits=8",
                                "quant.act_bits=8", "distill.iterations=2", "distill.batch_size=4",
                                "distill.init_rows=8", "threads=1"])
    assert rc == 0, log
    assert "conditional model" in log
    assert qdistill(["export", f"run={root / 'run'}", f"out={root / 'export'}"]) == 0
    guidance, scheduler = ("guidance_scale=4.0", "scheduler=ddim") if family == "pixart" else \
        ("guidance_scale=3.5", "scheduler=own")
    assert qdistill(["eval", f"model={root / 'export'}", f"reference={root / 'pipe'}", f"prompts={root / 'prompts.txt'}",
                     guidance, scheduler, "num_samples=2", "batch_size=2", "steps=4", "fidelity_samples=2",
                     f"out={root / 'eval'}", f"cache_dir={root / 'cache'}", "mode=integer", f"sample_size={SIZE}"]) == 0
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["psnr_db"] > 15, metrics  # decoded by the family's VAE, W8A8 on int8 kernels against FP
    from PIL import Image

    # one row of samples, 1 px of margin each side: 16 px images (this VAE keeps the size), not the model default
    assert Image.open(root / "eval" / "samples.png").size[1] == SIZE + 2


def test_the_shipped_dit_teacher_loads_records_and_quantizes(tmp_path):
    """assets/dit-teacher as it ships (docs/bench.md), loaded with from_pretrained: its blocks are the patch
    embedding, its 6 transformer blocks, the output modulation and the head; its recorded trajectories carry
    label seed % 10 and are its own predictions; quantization off is exact and W8A8 calibrated on those rows stays
    near FP."""
    model = load_denoiser("assets/dit-teacher").eval()
    assert type(model).__name__ == "DiTTransformer2DModel" and num_classes(model) == 10
    cfg = load_config(TrajectoryConfig, None, ["model=assets/dit-teacher", f"out={tmp_path / 't'}", "num_samples=4",
                                               "batch_size=4", "steps=10", "every=3"])
    assert record_calibration_set(cfg)["conditioning"] == "class"
    rows = load_shards(tmp_path / "t")[:]
    assert rows["class_label"].tolist() == [s % 10 for s in rows["sample_id"].tolist()]
    kw = to_model_inputs(rows, model)
    with torch.no_grad():
        ref = noise_prediction(model(**kw))
        torch.testing.assert_close(ref, rows["noise_pred"], rtol=1e-4, atol=1e-4)
        names = [b.name for b in find_blocks(model, kw)]
        assert names == ["pos_embed", *[f"transformer_blocks.{i}" for i in range(6)], "proj_out_1", "proj_out_2"]
        q = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=8, act_bits=8))
        set_quantization(q, weights=False, activations=False)
        torch.testing.assert_close(noise_prediction(q(**kw)), ref, rtol=1e-5, atol=1e-5)
        set_quantization(q, weights=True, activations=True)
        fit_ranges_(q, [kw])
        err = (noise_prediction(q(**kw)) - ref).pow(2).mean() / ref.pow(2).mean()
    assert 1e-7 < err < 0.02, err
