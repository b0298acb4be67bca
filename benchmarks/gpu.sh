#!/usr/bin/env bash
# The prepared commands for a lent GPU machine (benchmarks/gpu_run.py says what each measures):
#   bash benchmarks/gpu.sh 1                          # results into $OUT_DIR (or $OUT)
#   bash benchmarks/gpu.sh 2
#   GPU_DRY_RUN=1 OUT_DIR=/tmp/o bash benchmarks/gpu.sh 1   # the same steps on the CPU
cd "$(dirname "$0")/.."
exec python3 -m benchmarks.gpu_run "$@"
