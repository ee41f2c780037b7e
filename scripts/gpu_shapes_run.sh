#!/usr/bin/env bash
# On the lent GPU: the EFlow recipe (default flags) on the B preset for the demo's 8x16x16 shapes clips,
# time-boxed; then 4-step and 1-step samples. Writes PNGs and metrics to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu_setup.sh || exit 1
EFLOW="python3 -m eflow.cli.app"
timeout ${BUDGET_S:-470} $EFLOW train --preset B --size 16 --frames 8 --batch-size 32 --lr 3e-4 \
  --steps ${STEPS:-2200} --out /tmp/gB --set train.save_every=200 2>&1 | tr '\r' '\n' | grep -E "done|error" 
cp /tmp/gB/metrics.jsonl "$OUT/metrics.jsonl"
$EFLOW sample /tmp/gB --steps 4 --num 10 --out /tmp/s4 2>&1 | tail -5 && cp /tmp/s4/samples.png "$OUT/samples_4step.png"
$EFLOW sample /tmp/gB --steps 1 --num 10 --out /tmp/s1 2>&1 | tail -1 && cp /tmp/s1/samples.png "$OUT/samples_1step.png"
cp /tmp/s4/samples.gif "$OUT/samples_4step.gif"
