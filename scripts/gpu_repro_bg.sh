#!/usr/bin/env bash
# On the lent GPU machine (device tool): the paper's Tables 2, 3 and 4 at B size (`eflow repro`,
# docs/repro.md), too long for one 10-minute call. `start` launches `eflow repro $TABLES` in its own
# process session (so it outlives this command while the machine stays warm) and waits up to WAIT_S;
# `wait` (the next call, within the machine's warm period) waits for it again. Rows resume where a
# sitting stopped, so a new machine can continue from a copy of the run folders (weights included).
# Both copy what is done so far (the tables, the rows' eval reports and metrics; no weights) to $OUT.
# Scale: B preset, `shapes` 8x16x16 (8x8x8 tokens), batch 32, seed 0, lr 3e-4 (docs/results.md's GPU
# runs), STEPS (1500) per row, 512 clips per evaluation, PARALLEL (8) rows at once over every GPU.
#   TABLES=all PARALLEL=8 bash scripts/gpu_repro_bg.sh start; then: bash scripts/gpu_repro_bg.sh wait
#   ROWS=ours3,ours4 TABLES=table2 PARALLEL=2 bash scripts/gpu_repro_bg.sh start   # some rows only
#   CUDA_VISIBLE_DEVICES=1 GPUS=0 ... start     # every row on GPU 1 (GPUS=0: children keep the parent's devices)
# Needs .whl/ (docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu_bg.sh
R=/tmp/repro
if [ "${1:-start}" = start ]; then
  bg_start $R python3 -m eflow.cli.app repro ${TABLES:-all} --preset B --frames 8 --size 16 \
    --batch-size 32 --steps "${STEPS:-1500}" --seed 0 --set train.lr=3e-4 --eval-num 512 \
    --parallel "${PARALLEL:-8}" --gpus "${GPUS:-$(nvidia-smi -L | wc -l)}" ${ROWS:+--rows "$ROWS"} --out $R
fi
bg_wait $R repro
grep -v "━" $R/job.log | tail -40
for f in $R/*/*/metrics.jsonl; do echo "$f: $(wc -l < "$f") steps logged"; done
tar czf "$OUT/repro.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.distcp' -C /tmp repro
