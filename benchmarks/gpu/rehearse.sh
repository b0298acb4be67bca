#!/usr/bin/env bash
# Both GPU commands rehearsed here, on the CPU, with the lent machine's library versions (as the
# device tool's notes list them for 2026-11: Python 3.12, torch 2.11.0, onnx 1.23.1, onnx-ir
# 1.0.0, onnxscript 0.7.2, onnxruntime 1.30.0, transformers 5.17.0, numpy 2.5.2; diffusers and
# onnx-graphsurgeon absent) and the transfer kit prepare.sh made (onnxruntime-gpu, the wheels),
# from a copy of the tree as the device tool copies it. The steps run dry (the tiny model, the
# CPU provider): what differs from the CI's dry run is every version, the carried onnxruntime and
# the install from the carried wheels.
#   bash benchmarks/gpu/prepare.sh && bash benchmarks/gpu/rehearse.sh
# The first run builds the venv (torch 2.11's CUDA build from PyPI, about 5 GB, some minutes);
# REHEARSAL_VENV names another one. Results (results.jsonl, summary.md) are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -f .ortgpu/SHA256 ] || [ ! -d .whl ]; then
  echo "no transfer kit here (.ortgpu/, .whl/): run benchmarks/gpu/prepare.sh first" >&2
  exit 2
fi
venv=${REHEARSAL_VENV:-/tmp/adapedit-rehearsal-venv}
if [ ! -x "$venv/bin/python3" ]; then
  # a pyenv shim answers `command -v python3.12` and then fails to run: take one that runs
  py=${PYTHON312:-}
  if [ -z "$py" ]; then
    for candidate in python3.12 /root/.pyenv/versions/3.12.*/bin/python3.12; do
      if "$candidate" -c "" 2>/dev/null; then py=$candidate && break; fi
    done
  fi
  if [ -z "$py" ]; then
    echo "no Python 3.12 found (tried python3.12 and pyenv's): name one in PYTHON312" >&2
    exit 2
  fi
  "$py" -m venv "$venv"
fi
# every run (seconds once satisfied), so that a venv made by an earlier version of this list
# gets what was added since: requests, which the lent machine has and the carried diffusers
# needs (the kit installs it --no-deps)
"$venv/bin/pip" install -q torch==2.11.0 onnx==1.23.1 onnx-ir==1.0.0 onnxscript==0.7.2 \
  onnxruntime==1.30.0 transformers==5.17.0 numpy==2.5.2 safetensors sympy pillow tqdm matplotlib \
  requests
for absent in diffusers onnx_graphsurgeon adapedit; do
  if (cd / && "$venv/bin/python3" -c "import $absent" 2>/dev/null); then
    echo "$venv has $absent, which the lent machine has not (it comes from the kit)" >&2
    exit 2
  fi
done
work=$(mktemp -d)
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work"
cp -r .ortgpu .whl "$work/"
for n in 1 2; do
  (cd "$work" && PATH="$venv/bin:$PATH" GPU_DRY_RUN=1 OUT_DIR="$work/out-$n" \
    ADAPEDIT_SITE="$work/site" bash benchmarks/gpu.sh "$n")
done
echo
echo "rehearsed in $work: results in $work/out-1 and $work/out-2"
# a failed step has already stopped this script (gpu.sh exits 1 on one, under set -e); what its
# exit status does not say: a failure recorded inside a step, a smoke graph that did not run
"$venv/bin/python3" - "$work" <<'EOF'
import json
import sys
from pathlib import Path

bad = []
for n in (1, 2):
    for line in (Path(sys.argv[1]) / f"out-{n}" / "results.jsonl").read_text().splitlines():
        x = json.loads(line)
        if x["kind"] == "failed" or (x["kind"] == "smoke" and not x["ok"]):
            bad.append(f"command {n}: {line}")
print("\n".join(bad) or "every step ok, nothing failed")
sys.exit(1 if bad else 0)
EOF
