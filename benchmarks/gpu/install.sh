#!/usr/bin/env bash
# The GPU commands' install step, from carried files only (no network; from the repo root):
#   - the wheels in $WHL_DIR (default .whl: diffusers, onnx-graphsurgeon) into $ADAPEDIT_SITE;
#   - the project, from a clean copy of its sources (never the working tree, where a build/
#     folder would be written and a stale build/lib reused), into $ADAPEDIT_SITE.
# Both with pip (--no-index); where pip or setuptools cannot (a bare Python has neither), the
# wheels are unzipped and the sources copied in the installed layout instead, and that is said.
# onnxruntime-gpu is a step of its own (benchmarks/gpu_run.py unpack). The machine's torch and
# its CPU onnxruntime stay as they are; the GPU commands put the carried onnxruntime and
# $ADAPEDIT_SITE ahead of them on PYTHONPATH (benchmarks/gpu_run.py).
set -euo pipefail
SITE=${ADAPEDIT_SITE:-/tmp/adapedit-site}
WHL_DIR=${WHL_DIR:-.whl}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$SITE"
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$@"; }
if ls "$WHL_DIR"/*.whl >/dev/null 2>&1; then
  for w in "$WHL_DIR"/*.whl; do
    pip_install "$w" || { echo "pip could not install $w: unzipped into $SITE instead"; python3 -m zipfile -e "$w" "$SITE"; }
  done
fi
src=$(mktemp -d -t adapedit-src-XXXX)
trap 'rm -rf "$src"' EXIT
cp -r pyproject.toml README.md adapedit export engines runtime "$src"/
find "$src" -name __pycache__ -prune -exec rm -rf {} +
echo "setuptools: $(python3 -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || echo none) (the project builds with ≥ 77)"
if ! pip_install --no-build-isolation "$src"; then
  echo "pip could not install the project (no pip, or no setuptools ≥ 77?): its sources copied into $SITE instead"
  rm -rf "$SITE/adapedit"
  cp -r "$src/adapedit" "$SITE/adapedit"
  for pkg in export engines runtime; do cp -r "$src/$pkg" "$SITE/adapedit/$pkg"; done
fi
# the carried wheels were installed without their dependencies: importing them here names a
# missing one (diffusers checks requests, filelock and numpy on import) at this step, not the export's
PYTHONPATH="$SITE" PYTHONSAFEPATH=1 python3 -c '
import adapedit.runtime.session, adapedit.algorithm.edit, diffusers, onnx_graphsurgeon
print("adapedit", adapedit.__file__, "diffusers", diffusers.__version__)'
