#!/usr/bin/env bash
# The prepared commands for a lent GPU machine (benchmarks/gpu_run.py says what each measures):
#   GPU_DEADLINE_S=400 bash benchmarks/gpu.sh 1       # results into $OUT_DIR (or $OUT)
#   GPU_DEADLINE_S=200 bash benchmarks/gpu.sh 2       # (what is left of the loan; default 540)
#   GPU_DRY_RUN=1 OUT_DIR=/tmp/o bash benchmarks/gpu.sh 1   # the same steps on the CPU
cd "$(dirname "$0")/.."
exec python3 -m benchmarks.gpu_run "$@"
