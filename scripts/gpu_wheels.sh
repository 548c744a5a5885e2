#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, torch 2.11 with CUDA; no diffusers, deepspeed or datasets there):
# downloaded here into .whl/ (ignored by git), carried to the machine, installed by scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl \
  diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# DeepSpeed ships as source only: build its pure-Python wheel here (its ops are JIT-built where they run)
"${PY:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -la .whl
