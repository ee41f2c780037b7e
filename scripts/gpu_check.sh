#!/usr/bin/env bash
# Run on the lent GPU machine (device tool): the test suite incl. `gpu` tests under its torch, then the
# EFlow recipe end to end (B preset, bf16 autocast, compiled flex_attention, token dropping) and sampling.
# Needs the wheels the image lacks in .whl/ (see docs/benchmarks.md); writes logs and samples to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
[ -n "${CPU_SUITE:-}" ] && python3 -m pytest -q -x tests/ -m "not gpu" -p no:cacheprovider 2>&1 | tee "$OUT/cpu_tests_on_gpu_box.log" | tail -3
EFLOW="python3 -m eflow.cli.app"
$EFLOW train --preset B --frames 8 --size 64 --batch-size 8 --steps ${STEPS:-60} --lr 3e-4 \
  --out /tmp/gpurun --set train.preview_every=0 2>&1 | tail -3
cp /tmp/gpurun/metrics.jsonl "$OUT/metrics_B.jsonl"
$EFLOW sample /tmp/gpurun --steps 4 --num 4 --out "$OUT/samples_B" 2>&1 | tail -4
