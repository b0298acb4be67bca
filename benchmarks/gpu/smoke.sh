#!/usr/bin/env bash
# A short GPU check (about a minute on an H100): the tiny model through ONNX Runtime's CUDA
# provider against the PyTorch reference on the GPU — parity (fp32 and fp16, 10 steps) — into
# $OUT_DIR (default benchmarks/results/gpu). Same prerequisites as gpu.sh.
set -euo pipefail
OUT_DIR=${OUT_DIR:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
source benchmarks/gpu/env.sh
timeout "${PARITY_TIMEOUT:-200}" python3 -m benchmarks.parity --model tiny --steps 10 \
  --precisions fp32 fp16 --device cuda --seeds 0 --pairs 1 --backends ort-cuda \
  --results "$OUT_DIR" --tag parity_tiny_gpu 2>&1 | grep -v -i warning | tee "$OUT_DIR/smoke.log"
