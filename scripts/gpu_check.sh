#!/usr/bin/env bash
# The GPU check (qdistill.bench.gpu_check): calibrate -> train (1 rank, NCCL, bf16) -> export -> eval on the bench
# teacher, then a few distillation iterations per block on a random-weight SD-1.5-shaped UNet at full width.
# Prints PASS/FAIL, seconds and peak GPU memory per stage; sized for under 8 minutes on one H100/H200.
# Nothing is downloaded. A machine without diffusers/deepspeed/datasets takes wheels from .whl/ (made here
# beforehand by scripts/gpu_wheels.sh). Output: $OUT/gpu_check (or runs/gpu_check), and its log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-runs}/gpu_check"
mkdir -p "$OUT_DIR"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the checkout is the package (pyproject: package-dir qdistill = .): import it without installing
mkdir -p /tmp/qdistill-src && ln -sfn "$PWD" /tmp/qdistill-src/qdistill
export PYTHONPATH="/tmp/qdistill-src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset DS_ACCELERATOR
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
timeout 480 python3 -m qdistill.bench.gpu_check --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
