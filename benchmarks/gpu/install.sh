#!/usr/bin/env bash
# The GPU commands' install step, from carried files only (no network; from the repo root):
#   - the wheels in $WHL_DIR (default .whl: diffusers, onnx-graphsurgeon) into $ADAPEDIT_SITE;
#   - the project, from a clean copy of its sources (never the working tree, where a build/
#     folder would be written and a stale build/lib reused), into $ADAPEDIT_SITE;
#   - onnxruntime-gpu, if its parts are in $ORT_DIR (default .ortgpu): reassembled, checked
#     against SHA256 and unpacked into $ORT_DIR/site, once per archive.
# The machine's torch and its CPU onnxruntime stay as they are; the GPU commands put
# $ORT_DIR/site and $ADAPEDIT_SITE ahead of them on PYTHONPATH (benchmarks/gpu_run.py).
set -euo pipefail
SITE=${ADAPEDIT_SITE:-/tmp/adapedit-site}
WHL_DIR=${WHL_DIR:-.whl}
ORT_DIR=${ORT_DIR:-.ortgpu}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$SITE"
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$@"; }
if ls "$WHL_DIR"/*.whl >/dev/null 2>&1; then
  pip_install "$WHL_DIR"/*.whl
fi
src=$(mktemp -d -t adapedit-src-XXXX)
trap 'rm -rf "$src"' EXIT
cp -r pyproject.toml README.md adapedit export engines runtime "$src"/
find "$src" -name __pycache__ -prune -exec rm -rf {} +
pip_install --no-build-isolation "$src"
if ls "$ORT_DIR"/part-* >/dev/null 2>&1; then
  python3 -m benchmarks.gpu_run unpack "$ORT_DIR"
fi
PYTHONPATH="$ORT_DIR/site:$SITE" PYTHONSAFEPATH=1 python3 -c '
import adapedit.runtime.session, onnxruntime as o
print("adapedit", adapedit.__file__)
print("onnxruntime", o.__version__, o.__file__, o.get_available_providers())'
