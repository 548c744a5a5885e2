# The two entry points of the README. Both set up .venv on first use (nothing needed beforehand but
# python3 >= 3.10 and the package registries).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qdistill-installed

.PHONY: demo test setup clean grid

setup: $(STAMP)

# torch first, pinned to the CPU build that lies on this machine's disk (a bare `torch` requirement would
# pull a multi-GB CUDA build); DeepSpeed ships only as source and imports torch in its setup.py, so it is
# built against that torch without build isolation.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation "deepspeed>=0.15"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The demo: record calibration trajectories from the bench teacher (assets/teacher, shipped), distil it to W4A4
# with the recommended recipe (configs/demo.yaml: DilateQuant + keep sensitive + low rank 1 + weight groups of 4 +
# end to end) at demo length, export packed integer weights, and judge the export with `qdistill eval` on int8
# kernels against the FP teacher (runs/demo-w4a4/; ends with eval's metrics table: FP and quantized FD, and the
# FP | quantized grid runs/demo-w4a4/eval/samples.png).
QDISTILL := $(VENV)/bin/qdistill

runs/trajectories/manifest.json: assets/teacher/unet/diffusion_pytorch_model.safetensors | $(STAMP)
	$(QDISTILL) calibrate --config calibrate overwrite=true

demo: $(STAMP) runs/trajectories/manifest.json
	$(QDISTILL) train --config demo
	$(QDISTILL) export run=runs/demo-w4a4 out=runs/demo-w4a4/export
	$(QDISTILL) eval --config eval model=runs/demo-w4a4/export out=runs/demo-w4a4/eval cache_dir=runs/fp_reference_cache

# The README's FP | W4A8 | W4A4 grid (docs/grid.png): DilateQuant at 200 iterations per block (the README table's
# setting), exported with PTQD's noise correction, 32 seeds on int8 kernels (46 min on 2 cores, 2026-12-01).
# Training resumes from its checkpoints when interrupted.
grid: $(STAMP) runs/trajectories/manifest.json
	for b in 8 4; do \
	  $(QDISTILL) train --config dilatequant out=runs/grid-w4a$$b quant.act_bits=$$b distill.iterations=200 && \
	  $(QDISTILL) export --config dilatequant+ptqd run=runs/grid-w4a$$b out=runs/grid-w4a$$b/export || exit 1; \
	done
	$(PY) -m qdistill.bench.grid --exports runs/grid-w4a8/export runs/grid-w4a4/export --out docs/grid.png

# All tests, the slow ones (launchers, a fresh-venv install) included.
test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
