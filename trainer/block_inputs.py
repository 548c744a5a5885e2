"""Each block's inputs and targets for all of a rank's calibration rows, captured block after block at the cost
of the block itself (docs/design.md §3.5).

Block k's call is captured from the live models (trainer/capture.py) with every earlier block replaced by its
output, computed once, when that block was the one captured: the teacher's outputs (block k's FP output is
its target) and, with quantized block inputs, the trained student block's outputs on its own captured inputs.
An output is carried until the last block that reads it (trainer/block_graph.py: a UNet's skip stack and time
embedding), so capturing block k costs one teacher forward and one student forward of block k per row, plus
the model's code between blocks, instead of the whole prefix for every block. Every store is kept within a
budget (trainer/row_store.py): a block's inputs that fit nowhere are captured again for every batch (still
from the carried outputs), and when the carried outputs do not fit, capture runs the prefix, as it must for a
model whose blocks are not each called once in order.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..denoisers import latent_name
from ..devices import autocast
from ..quantizers import Block, block_output, set_timesteps
from .block_graph import BlockGraph
from .capture import BlockCalls, capture_block_call, substituted
from .row_store import RowStore, StorageBudget

logger = logging.getLogger(__name__)


class BlockInputs:
    """Block calls of `teacher` and `student` for the rows of `chunks` ((first row, rows) each, in order, covering
    0 .. total rows); `model_inputs(rows)` gives the model kwargs of any rows. `quantized_inputs`: the student's
    blocks learn from the quantized chain's inputs (else from the FP chain's). `graph` None: capture runs the
    prefix (today's models whose blocks run out of order)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, blocks_fp: list[Block], blocks_q: list[Block],
                 chunks: list[tuple[int, int]], model_inputs, quantized_inputs: bool, budget: StorageBudget,
                 graph: BlockGraph | None, device: torch.device, precision: str = "fp32", rank: int = 0):
        self.teacher, self.student = teacher, student
        self.fp, self.q = [b.module for b in blocks_fp], [b.module for b in blocks_q]
        self.names = [b.name for b in blocks_q]
        self.chunks, self.model_inputs, self.quantized_inputs = chunks, model_inputs, quantized_inputs
        self.total_rows = sum(n for _, n in chunks)
        self.budget, self.graph, self.device, self.precision, self.rank = budget, graph, device, precision, rank
        self.carried: dict[str, dict[int, RowStore]] = {"teacher": {}, "student": {}}
        self.k = -1
        self.last = len(self.q)  # blocks from here on are not trained: nothing is carried to them
        self.inputs: RowStore | None = None  # block k's inputs (args, kwargs) of every row
        self.targets: RowStore | None = None  # block k's FP output of every row
        self.forwards = 0  # row-forwards of blocks run for block k's capture (a forward of one block on one row: 1)

    # -- one call of block k --------------------------------------------------------------------------
    def _capture(self, k: int, rows: torch.Tensor, kwargs: dict, teacher: bool, with_output: bool) -> dict:
        model, blocks = (self.teacher, self.fp) if teacher else (self.student, self.q)
        outputs = {}
        if self.graph is not None:
            carried, batch = self.carried["teacher" if teacher else "student"], kwargs[latent_name(model)].shape[0]
            for j in range(k):
                if j in self.graph.reads[k]:
                    outputs[blocks[j]] = carried[j].select(rows)
                else:  # not read by block k: only its shape matters to the code between blocks
                    outputs[blocks[j]] = self.graph.layouts[j].placeholder(batch, self.device)
        with BlockCalls(blocks) as calls, substituted(outputs), autocast(self.device, self.precision):
            seen = capture_block_call(model, blocks[k], kwargs, with_output)
        self.forwards += calls.calls * len(rows)
        return seen

    def _call(self, k: int, rows: torch.Tensor, with_target: bool) -> dict:
        """Block k's call for `rows`: the student's inputs and, if asked, the teacher's full output."""
        kwargs = self.model_inputs(rows)
        fp = self._capture(k, rows, kwargs, teacher=True, with_output=with_target)
        q = self._capture(k, rows, kwargs, teacher=False, with_output=False) if self.quantized_inputs else fp
        t = torch.as_tensor(kwargs["timestep"]).reshape(-1).float()
        return {"args": q["args"], "kwargs": q["kwargs"], "t": t, "full_output": fp.get("full_output")}

    # -- a block's rows ---------------------------------------------------------------------------------
    def begin(self, k: int, keep_inputs: bool = True) -> None:
        """Capture block k for every row: its targets (also what later blocks read of the teacher) and, if
        `keep_inputs` and they fit, its inputs."""
        self._end_inputs()
        self.k, self.forwards = k, 0
        for start, n in self.chunks:
            rows = torch.arange(start, start + n)
            call = self._call(k, rows, with_target=True)
            if start == 0:
                fold = call["t"].shape[0] // n
                self.targets = RowStore.create(call["full_output"], n, self.total_rows, fold, self.budget)
                if self.targets is None:
                    if self.graph is None:
                        break  # nothing to keep: every batch is captured afresh
                    self._abandon_graph(k, "block outputs")
                    return self.begin(k, keep_inputs)
            inputs = {"args": call["args"], "kwargs": call["kwargs"], "t": call["t"]}
            if start == 0 and keep_inputs:
                self.inputs = RowStore.create(inputs, n, self.total_rows, fold, self.budget)
            self.targets.put(call["full_output"], start)
            if self.inputs is not None:
                self.inputs.put(inputs, start)

    @property
    def cached(self) -> bool:
        return self.inputs is not None and self.targets is not None

    def batch(self, rows: torch.Tensor) -> dict:
        """Block k's call for `rows` (indices of this rank's rows): student inputs, FP target, timesteps."""
        if self.cached:
            data = self.inputs.select(rows)
            return {**data, "target": block_output(self.targets.select(rows))}
        call = self._call(self.k, rows, with_target=self.targets is None)
        output = call.pop("full_output") if self.targets is None else self.targets.select(rows)
        return {**call, "target": block_output(output)}

    def end(self, k: int) -> None:
        """Block k is final: carry its outputs to the blocks that read them, drop what no later block reads."""
        assert k == self.k, (k, self.k)
        if self.graph is not None:
            read_later = min(self.graph.last_reader(k), self.last - 1) > k
            if read_later and self.quantized_inputs:
                self._carry_student(k)
            if read_later and self.graph is not None:  # (None when the student's outputs did not fit)
                self.carried["teacher"][k] = self.targets
                self.targets = None
            for who in ("teacher", "student"):
                for j in [j for j in self.carried[who] if min(self.graph.last_reader(j), self.last - 1) <= k]:
                    self.carried[who].pop(j).release()
        self._end_inputs()

    def skip(self, k: int) -> None:
        """Carry block k's outputs without training it (a resumed run's finished blocks)."""
        self.begin(k, keep_inputs=False)
        self.end(k)

    def _carry_student(self, k: int) -> None:
        block, store = self.q[k], None
        for start, n in self.chunks:
            rows = torch.arange(start, start + n)
            data = self.inputs.select(rows) if self.inputs is not None else self._call(k, rows, with_target=False)
            set_timesteps(block, data["t"].to(self.device))
            with torch.no_grad(), BlockCalls([block]) as calls, autocast(self.device, self.precision):
                output = block(*data["args"], **data["kwargs"])
            self.forwards += calls.calls * n
            if store is None:
                store = RowStore.create(output, n, self.total_rows, data["t"].shape[0] // n, self.budget)
                if store is None:
                    self._abandon_graph(k, "student block outputs")
                    return
            store.put(output, start)
        set_timesteps(block, None)
        self.carried["student"][k] = store

    def _abandon_graph(self, k: int, what: str) -> None:
        if self.rank == 0:
            logger.warning(f"block {k + 1} ({self.names[k]}): the carried {what} do not fit in distill.cache_mb "
                           "and distill.cache_disk_mb; from here on block inputs are captured by running the "
                           "model up to each block")
        self._release_carried()
        if self.targets is not None:
            self.targets.release()
            self.targets = None
        self.graph = None

    def _end_inputs(self) -> None:
        for store in (self.inputs, self.targets):
            if store is not None:
                store.release()
        self.inputs = self.targets = None

    def close(self) -> None:
        self._end_inputs()
        self._release_carried()

    def _release_carried(self) -> None:
        for stores in self.carried.values():
            for store in stores.values():
                store.release()
            stores.clear()
