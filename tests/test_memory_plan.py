"""scripts/plan.py's figures (trainer/memory_plan.py), worked out on the meta device, against what the real
model and the trainer's own block-input capture use on the CPU; and the script's table and errors."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_unet
from diffusers import DDPMPipeline, DDPMScheduler

from qdistill.configs import load_config
from qdistill.configs.schema import TrainConfig
from qdistill.quantizers import fit_ranges_, find_blocks, quantize_
from qdistill.trainer import memory_plan
from qdistill.trainer.block_graph import trace_block_graph
from qdistill.trainer.block_inputs import BlockInputs
from qdistill.trainer.row_store import StorageBudget

ROWS, CHUNK = 12, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "model"
    DDPMPipeline(unet=build_unet("attn-lpb1"), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_plan(model_dir):
    return memory_plan.plan(train_config(), str(model_dir), rows=ROWS)


def train_config(**extra):
    overrides = ["quant.weight_bits=4", "quant.act_bits=8", f"distill.batch_size={CHUNK}", "distill.iterations=10"]
    return load_config(TrainConfig, "dilatequant", overrides + [f"{k}={v}" for k, v in extra.items()])


def test_meta_block_costs_equal_the_real_models(tiny_plan):
    """Per-row FLOPs, inputs, outputs and saved activations counted on meta equal those counted on real CPU
    tensors of the same model."""
    cfg, meta = train_config(), tiny_plan
    teacher = build_unet("attn-lpb1")
    student = quantize_(copy.deepcopy(teacher), cfg.quant, init_weights=False)
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)
    probe = memory_plan.example_inputs(teacher, 2, device="cpu")
    blocks_fp, blocks_q = find_blocks(teacher, probe), find_blocks(student, probe)
    real = memory_plan._block_costs(teacher, student, blocks_fp, blocks_q, "dilatequant",
                                    lambda b: memory_plan.example_inputs(teacher, b, device="cpu"), CHUNK)
    assert [c.name for c in meta.blocks] == [c.name for c in real]
    assert meta.blocks == real
    assert meta.teacher_bytes == memory_plan.state_bytes(teacher)
    assert all(c.flops > 0 and c.saved_bytes > 0 for c in real)
    # training forward-equivalents: 3 x iterations x batch over the rows, summed over blocks, in whole-model units
    assert meta.train_fwd_per_row == pytest.approx(3 * 10 * CHUNK / ROWS)
    assert 1.9 < meta.capture_fwd_per_row <= 2.0  # each block once per model (the last: the teacher only)


def test_planned_cache_is_what_the_capture_holds_at_its_peak(tiny_plan):
    """The plan's block-input cache (carried outputs of both models, the block's inputs and targets) against the
    most the trainer's capture held at once over all blocks, on the same model and rows."""
    cfg, planned = train_config(), tiny_plan.cache_bytes
    teacher = build_unet("attn-lpb1")
    student = quantize_(copy.deepcopy(teacher), cfg.quant)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(ROWS, 3, 16, 16, generator=g), torch.tensor([999.0, 500, 0] * 4)
    fit_ranges_(student, [{"sample": x[:6], "timestep": t[:6]}])
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)

    def model_inputs(rows):
        return {"sample": x[rows], "timestep": t[rows]}

    example = model_inputs(torch.arange(2))
    blocks_fp, blocks_q = find_blocks(teacher, example), find_blocks(student, example)
    graph = trace_block_graph(teacher, [b.module for b in blocks_fp], example)
    budget = StorageBudget(256)
    inputs = BlockInputs(teacher, student, blocks_fp, blocks_q, [(a, CHUNK) for a in range(0, ROWS, CHUNK)],
                         model_inputs, True, budget, graph, torch.device("cpu"))
    for k in range(len(blocks_q)):
        inputs.begin(k)
        inputs.end(k)
    inputs.close()
    assert budget.in_use == 0 and budget.peak > 0
    assert planned == pytest.approx(budget.peak, rel=0.05)


def test_plan_script_prints_a_column_per_rank_count_and_refuses_a_bad_model(model_dir, capsys):
    assert memory_plan.main(["--model", str(model_dir), "--rows", "64", "--ranks", "1,2", "distill.batch_size=4",
                             "quant.attention_chunk_mb=0"]) == 0
    out = capsys.readouterr().out
    assert "| per rank | 1 rank | 2 ranks |" in out and "| peak (sum of the memory parts) |" in out
    assert "| calibration rows / batch | 64 / 4 | 32 / 2 |" in out
    assert memory_plan.main(["--model", str(model_dir / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model") and "\n" not in err
    assert memory_plan.main(["--model", str(model_dir), "--ranks", "3"]) == 2  # 32 rows a batch over 3 ranks
    assert "not a multiple of 3 ranks" in capsys.readouterr().err
