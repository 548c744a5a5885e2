"""Capturing block inputs from carried block outputs (trainer/block_inputs.py) against running the model up to
each block: the same calls within float rounding, at the cost of the block itself, on an SD-shaped UNet
(cross-attention down and up blocks, a skip stack, guidance batches)."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_unet, calibration_batches
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from qdistill.quantizers import QuantConfig, block_output, fit_ranges_, find_blocks, quantize_, set_timesteps
from qdistill.trainer.block_graph import trace_block_graph
from qdistill.trainer.block_inputs import BlockInputs
from qdistill.trainer.row_store import StorageBudget

ROWS, CHUNK = 12, 4


def guided_rows(unet, dtype):
    """Per-row model inputs with classifier-free guidance: a model batch is [uncond rows, cond rows]."""
    g = torch.Generator().manual_seed(3)
    c, s, d = unet.config.in_channels, unet.config.sample_size, unet.config.cross_attention_dim
    x = torch.randn(ROWS, c, s, s, generator=g, dtype=dtype)
    t = torch.tensor([999.0, 750, 500, 250, 0, 500] * 2)
    cond, uncond = torch.randn(ROWS, 5, d, generator=g, dtype=dtype), torch.randn(ROWS, 5, d, generator=g, dtype=dtype)

    def model_inputs(rows):
        return {"sample": torch.cat([x[rows]] * 2), "timestep": torch.cat([t[rows]] * 2),
                "encoder_hidden_states": torch.cat([uncond[rows], cond[rows]])}
    return model_inputs


def setup(dtype, graph: bool):
    teacher = build_unet("xattn-lpb2").to(dtype)
    student = quantize_(copy.deepcopy(teacher), QuantConfig(weight_bits=4, act_bits=8))
    fit_ranges_(student, [{k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()}
                         for b in calibration_batches(teacher)])
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)  # as the distiller has them outside a block's engine
    model_inputs = guided_rows(teacher, dtype)
    example = model_inputs(torch.arange(2))
    blocks_fp, blocks_q = find_blocks(teacher, example), find_blocks(student, example)
    chunks = [(a, CHUNK) for a in range(0, ROWS, CHUNK)]

    def make(s, g, budget=None):
        return BlockInputs(teacher, s, blocks_fp, find_blocks(s, example), chunks, model_inputs, True,
                           budget or StorageBudget(256), g, torch.device("cpu"))
    g = trace_block_graph(teacher, [b.module for b in blocks_fp], example) if graph else None
    return teacher, student, blocks_q, make, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_carried_outputs_give_the_calls_running_the_prefix_gives_at_two_forwards_per_row(dtype):
    """Every block's student inputs and FP targets equal the prefix capture's (within float rounding), while
    blocks are changed as training changes them; capture costs 2 block forwards per row (1 for the last block),
    counted by the code and, independently, by the FLOPs torch runs."""
    teacher, student, blocks, make, graph = setup(dtype, graph=True)
    assert graph is not None
    twin = copy.deepcopy(student)  # trained the same way, captured by running the prefix
    carry, prefix = make(student, graph), make(twin, None)
    rows = torch.arange(ROWS)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    twin_blocks = find_blocks(twin, guided_rows(teacher, dtype)(torch.arange(2)))
    assert [b.name for b in twin_blocks] == [b.name for b in blocks]
    n = len(blocks)
    for k in range(n):
        with FlopCounterMode(display=False) as flops:
            carry.begin(k)
        prefix.begin(k)
        a, b = carry.batch(rows), prefix.batch(rows)
        torch.testing.assert_close(a["t"], b["t"], rtol=0, atol=0)
        for x, y in zip(tree_leaves((a["args"], a["kwargs"], a["target"])), tree_leaves((b["args"], b["kwargs"], b["target"]))):
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype == (dtype if x.is_floating_point() else x.dtype)
                torch.testing.assert_close(x, y, **tol)
        # "training": the same change to block k in both students
        with torch.no_grad():
            for p, q in zip(blocks[k].module.parameters(), twin_blocks[k].module.parameters()):
                delta = 0.01 * torch.randn_like(p)
                p.add_(delta)
                q.add_(delta)
        with FlopCounterMode(display=False) as end_flops:
            carry.end(k)
        prefix.end(k)
        expected = 2.0 if k < n - 1 else 1.0  # the last block's student outputs are read by no block
        assert carry.forwards / ROWS == expected, (k, carry.forwards / ROWS)
        assert prefix.forwards / ROWS == 2 * k + 1
        # independently: what ran costs what one teacher and one student forward of block k cost
        with FlopCounterMode(display=False) as one:
            set_timesteps(blocks[k].module, a["t"])
            blocks[k].module(*a["args"], **a["kwargs"])
        cost = flops.get_total_flops() + end_flops.get_total_flops()
        assert cost <= expected * one.get_total_flops() * 1.001, (k, cost, one.get_total_flops())
    # what was carried was dropped after its last reader
    assert not carry.carried["teacher"] and not carry.carried["student"]
    carry.close()
    prefix.close()


def test_a_resumed_run_carries_what_an_uninterrupted_one_carried():
    """skip() (a resumed run's finished blocks) leaves the same carried outputs, bit for bit."""
    teacher, student, blocks, make, graph = setup(torch.float32, graph=True)
    run, resumed = make(student, graph), make(student, graph)
    for k in range(5):
        run.begin(k)
        run.end(k)
        resumed.skip(k)
    for who in ("teacher", "student"):
        assert run.carried[who].keys() == resumed.carried[who].keys() and run.carried[who]
        for j in run.carried[who]:
            for x, y in zip(tree_leaves(run.carried[who][j].select(torch.arange(ROWS))),
                            tree_leaves(resumed.carried[who][j].select(torch.arange(ROWS)))):
                assert torch.equal(x, y)


def test_a_budget_too_small_for_the_carried_outputs_falls_back_to_the_prefix(tmp_path):
    """Memory first, then disk; when neither holds the carried outputs, capture runs the prefix (same calls)."""
    teacher, student, blocks, make, graph = setup(torch.float32, graph=True)
    tiny, disk = make(student, graph, StorageBudget(0, 0)), make(student, graph, StorageBudget(0, 64, tmp_path))
    ref = make(student, graph)
    for k in range(4):
        for b in (tiny, disk, ref):
            b.begin(k)
        x, y, z = (b.batch(torch.arange(ROWS)) for b in (tiny, disk, ref))
        torch.testing.assert_close(block_output(x["target"]), block_output(z["target"]))
        assert all(torch.equal(p, q) for p, q in zip(tree_leaves(y), tree_leaves(z)) if isinstance(p, torch.Tensor))
        for b in (tiny, disk, ref):
            b.end(k)
    assert tiny.graph is None and not tiny.cached
    assert disk.graph is not None and disk.targets is None and disk.carried["teacher"]
    assert all(s.where == "disk" for s in disk.carried["teacher"].values())
