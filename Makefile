# The two entry points of the README. Both set up .venv on first use (nothing needed beforehand but
# python3 >= 3.10 and the package registries).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qdistill-installed
DEMO_MODEL ?= runs/demo-model

.PHONY: demo test setup clean

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

$(DEMO_MODEL)/model_index.json: | $(STAMP)
	$(PY) scripts/build_demo_model.py --out $(DEMO_MODEL)

demo: $(STAMP) $(DEMO_MODEL)/model_index.json
	$(PY) scripts/quantize.py --config configs/rtn.yaml model=$(DEMO_MODEL) out=runs/demo-rtn

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
