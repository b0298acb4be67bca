#!/usr/bin/env bash
# One prepared command for a GPU machine (no network): installs the project without touching
# the machine's torch, then runs the latency and parity benchmarks with every backend it finds
# (PyTorch fp16 reference always; ONNX Runtime CUDA / TensorRT EP when onnxruntime-gpu is on
# PYTHONPATH; native TensorRT when `tensorrt` imports), sd14-random at 512×512, and writes
# everything under $OUT_DIR (default benchmarks/results/gpu). Budget: about 8 minutes on an H100.
#
# What must travel with the repo (see benchmarks/README.md): wheels of the project's pure-Python
# dependencies missing there (diffusers, polygraphy) in .whl/, and optionally onnxruntime-gpu
# in parts (.ortgpu/, benchmarks/gpu/prepare.sh and install-parts.sh).
set -euo pipefail
OUT_DIR=${OUT_DIR:-benchmarks/results/gpu}
STEPS=${STEPS:-20}
mkdir -p "$OUT_DIR"
source benchmarks/gpu/env.sh
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
python3 - <<'PY' | tee "$OUT_DIR/backends.txt"
import onnxruntime as o, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("onnxruntime", o.__version__, o.get_available_providers())
try:
    import tensorrt; print("tensorrt", tensorrt.__version__)
except ImportError as e:
    print("tensorrt: not importable:", e)
PY
timeout "${LATENCY_TIMEOUT:-330}" python3 -m benchmarks.latency --model sd14-random --height 512 --steps "$STEPS" \
  --precision fp16 --device cuda --warmup 1 --repeats 3 --results "$OUT_DIR" 2>&1 | tee "$OUT_DIR/latency.log"
if [ "${SKIP_PARITY:-0}" = 1 ]; then
  echo "parity skipped (SKIP_PARITY=1)" | tee "$OUT_DIR/parity.log"
elif python3 -c "from benchmarks.common import available_backends as a; import sys; sys.exit(0 if [b for b in a() if b.name != 'ort-cpu'] else 1)"; then
  timeout 150 python3 -m benchmarks.parity --model sd14-random --height 512 --steps 10 \
    --precisions fp16 --device cuda --seeds 0 --pairs 1 \
    --backends $(python3 -c "from benchmarks.common import available_backends as a; print(' '.join(b.name for b in a() if b.name != 'ort-cpu'))") \
    --results "$OUT_DIR" --tag parity_sd14_gpu 2>&1 | tee "$OUT_DIR/parity.log"
else
  echo "no GPU backend here: parity not run" | tee "$OUT_DIR/parity.log"
fi
