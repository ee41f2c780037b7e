#!/usr/bin/env bash
# On the lent GPU machine: `start` launches scripts/sweep.py on scripts/sweeps/$SWEEP.toml in its own
# process session (so it outlives this command while the machine stays warm) and waits up to WAIT_S;
# `wait` (the next call, within the machine's warm period) waits for it to finish. Both copy what is
# done so far (results.md/json, eval reports, metrics; no weights) to $OUT. Needs .whl/ (docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu_bg.sh
SW=/tmp/sweep
if [ "${1:-start}" = start ]; then
  bg_start $SW python3 scripts/sweep.py scripts/sweeps/${SWEEP:?}.toml --out $SW --parallel ${PARALLEL:-8} \
    --gpus "$(nvidia-smi -L | wc -l)"
fi
bg_wait $SW sweep
tail -5 $SW/job.log
for f in $SW/*/metrics.jsonl; do n=$(basename $(dirname $f)); echo "$n: $(wc -l < $f) steps logged, last it/s $(tail -1 $f | python3 -c 'import json,sys; print(round(json.loads(sys.stdin.read())["it_s"],2))')"; done
cat $SW/results.md 2>/dev/null
cp $SW/results.md $SW/results.json "$OUT/" 2>/dev/null
tar czf "$OUT/sweep.tgz" --exclude='*.safetensors' --exclude='*.pt' -C /tmp sweep
