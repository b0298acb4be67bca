# Sourced by the GPU scripts (from the repo root): installs the project and the wheels in .whl/
# into $ADAPEDIT_SITE (default /tmp/adapedit-site) without touching the machine's torch, and
# sets PYTHONPATH.
ADAPEDIT_SITE=${ADAPEDIT_SITE:-/tmp/adapedit-site}
mkdir -p "$ADAPEDIT_SITE"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$ADAPEDIT_SITE" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$ADAPEDIT_SITE" .
# the installed package first: the repo's own adapedit/ folder lacks the export/, engines/ and
# runtime/ subpackages that the install maps into it; the repo after it, for benchmarks/
export PYTHONPATH=$ADAPEDIT_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1  # not the working directory first
if [ -d .ortgpu/site ]; then export PYTHONPATH=$PWD/.ortgpu/site:$PYTHONPATH; fi
export PYTHONUNBUFFERED=1
