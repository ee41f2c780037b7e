# Sourced by the scripts/gpu_*.sh scripts on the lent GPU machine (device tool): installs the wheels the
# image lacks from .whl/ (see docs/benchmarks.md) into /tmp/site and eflow itself, once per machine (a
# second script on the same warm machine finds the marker and skips it), and sets the environment.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 EFLOW_PLUGINS=
if [ ! -f /tmp/site/.eflow_ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null || exit 1
  touch /tmp/site/.eflow_ready
fi
