#!/usr/bin/env bash
# The prepared command for a lent GPU machine (no network). From the repo root:
#
#   bash benchmarks/gpu.sh                  # sd14-random, 512×512, fp16, 50 steps, on CUDA
#   GPU_DRY_RUN=1 bash benchmarks/gpu.sh    # the same steps on the CPU: tiny, 128 px, fp32
#
# Steps, each in its own process with its own time limit, each logged to $OUT_DIR/<step>.log; a
# failing step is recorded and the next ones still run (exit status 1 at the end):
#   install   the project into $ADAPEDIT_SITE without touching the machine's torch
#             (benchmarks/gpu/env.sh; wheels in .whl/, onnxruntime-gpu parts in .ortgpu/)
#   backends  versions and the execution providers found → backends.txt
#   export    `adapedit export --shapes static` (batches 2 and 4; segmented, whole, fused)
#   graphs    ONNX Runtime's optimised graphs on the provider: Memcpy nodes, integer inputs
#   latency   UNet call (reference eager/SDPA, ORT whole, segmented, fused + CUDA graph), the
#             edit end to end (reference vs each form), controller time, GPU memory of the
#             shared UNet weights
#   parity    the runtime against the PyTorch reference in the same precision
#   peer      the PyTorch UNet with the edit inside: eager, CUDA graph, torch.compile
# Budget on a GPU: about 10 minutes on an H100 (export ≈ 3, latency ≈ 3, parity ≈ 1.5,
# peer ≈ 2.5 with compilation); each step has its own limit, so a slow one loses only itself.
set -uo pipefail
if [ "${GPU_DRY_RUN:-0}" = 1 ]; then
  MODEL=${MODEL:-tiny} SIZE=${SIZE:-128} STEPS=${STEPS:-3} PRECISION=fp32 DEVICE=cpu
  PROVIDER=cpu WARMUP=0 REPEATS=1 JOBS=1 PARITY_STEPS=${STEPS:-3} COMPILE=""
  OUT_DIR=${OUT_DIR:-$(mktemp -d -t adapedit-gpu-dry-XXXX)}
else
  MODEL=${MODEL:-sd14-random} SIZE=${SIZE:-512} STEPS=${STEPS:-50} PRECISION=fp16 DEVICE=cuda
  PROVIDER=cuda WARMUP=1 REPEATS=3 JOBS=${JOBS:-3} PARITY_STEPS=${PARITY_STEPS:-20}
  COMPILE=--compile
  OUT_DIR=${OUT_DIR:-benchmarks/results/gpu}
fi
WORK=${WORK:-$(mktemp -d -t adapedit-gpu-work-XXXX)}
mkdir -p "$OUT_DIR"
failed=()

step() {  # step NAME SECONDS COMMAND…
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  if timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1; then
    echo "   ok"
  else
    echo "   FAILED ($?): see $OUT_DIR/$name.log"
    tail -5 "$OUT_DIR/$name.log"
    failed+=("$name")
  fi
}

step install 120 bash -c 'source benchmarks/gpu/env.sh && python3 -c "import adapedit.runtime.session"'
source benchmarks/gpu/env.sh
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$OUT_DIR/nvidia-smi.txt"
step backends 60 python3 -c '
import onnxruntime as o, torch
from benchmarks.common import available_backends
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("onnxruntime", o.__version__, o.get_available_providers())
print("backends", [b.name for b in available_backends()])
try:
    import tensorrt; print("tensorrt", tensorrt.__version__)
except ImportError as e:
    print("tensorrt: not importable:", e)'
cp "$OUT_DIR/backends.log" "$OUT_DIR/backends.txt"
step export "${EXPORT_TIMEOUT:-300}" python3 -m adapedit.cli export --model "$MODEL" \
  --out "$WORK/export" --precision "$PRECISION" --shapes static --batches 2 4 \
  --height "$SIZE" --width "$SIZE" --form segmented whole fused --jobs "$JOBS" --quiet
step graphs 120 python3 -m benchmarks.graph_check --export-dir "$WORK/export" \
  --providers "$PROVIDER" --results "$OUT_DIR" --tag graph_check
step latency "${LATENCY_TIMEOUT:-240}" python3 -m benchmarks.latency --export-dir "$WORK/export" \
  --device "$DEVICE" --precision "$PRECISION" --steps "$STEPS" --warmup "$WARMUP" \
  --repeats "$REPEATS" --results "$OUT_DIR" --tag latency
step parity "${PARITY_TIMEOUT:-120}" python3 -m benchmarks.parity --export-dir "$WORK/export" \
  --device "$DEVICE" --reference-precision "$PRECISION" --steps "$PARITY_STEPS" --seeds 0 \
  --pairs 1 --results "$OUT_DIR" --tag parity
step peer "${PEER_TIMEOUT:-240}" python3 -m benchmarks.peer --model "$MODEL" --height "$SIZE" \
  --precision "$PRECISION" --warmup "$WARMUP" --repeats "$((REPEATS * 3))" $COMPILE \
  --results "$OUT_DIR" --tag peer
rm -rf "$WORK"
echo "results in $OUT_DIR"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
