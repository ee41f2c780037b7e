#!/usr/bin/env bash
# Run on the lent GPU machine (device tool): every attention backend's GPU tests (fast path vs its CPU
# reference, bf16/fp32, forward and gradients, with and without dropped tokens), then the side-by-side
# benchmark of docs/benchmarks.md. Needs the wheels the GPU image lacks in .whl/; writes logs and results
# to $OUT. HEADS / HEAD_DIM choose the head layout (default 12 x 128); XL's is 16 x 72 (1152 / 16), e.g.
#   SKIP_TESTS=1 ATTN=softmax,glga TOKENS=32760 DROP=0 HEADS=16 HEAD_DIM=72 bash scripts/gpu_attention.sh
# BRANCHES times GLGA's branches apart (before the side-by-side bench; SKIP_BENCH=1 skips that), e.g.
#   SKIP_TESTS=1 SKIP_BENCH=1 BRANCHES="gated window linear sum" DROP=0,0.75 bash scripts/gpu_attention.sh
# ATTN may hold variants (LABEL=BACKEND) and BENCH_SET their --set options, e.g. (issue 17's targets):
#   SKIP_TESTS=1 ATTN=softmax,softmax-flash=softmax,glga-fp32=glga,glga TOKENS=8190,32760,124800 \
#     BENCH_SET="--set softmax-flash.kernel=flash --set glga-fp32.linear_precision=fp32" bash scripts/gpu_attention.sh
# GLGA_SET adds glga options to the BRANCHES runs, e.g. GLGA_SET="--set glga.linear_precision=fp32" TAG=-fp32
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -q -m gpu tests/ -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [ -n "${BRANCHES:-}" ]; then  # GLGA's parts timed apart, e.g. BRANCHES="gated window linear sum" (issue 17):
  # window = the flex band + its norm, linear = the fp32 Q(K^T V) branch + its norm; only "gated" with the
  # sigmoid gate runs the one fused graph (gated_glga), the others the unfused path
  for b in $BRANCHES; do
    python3 -m eflow.cli.app bench attention --attn glga --set glga.branches=$b ${GLGA_SET:-} \
      --tokens ${TOKENS:-32760} --drop ${DROP:-0} --mode fwd,fwd+bwd --heads ${HEADS:-12} --head-dim ${HEAD_DIM:-128} \
      --batch 1 --dtype ${DTYPE:-bf16} --warmup ${WARMUP:-3} --repeats ${REPEATS:-10} --no-plot \
      --out "$OUT/bench_glga_$b${TAG:-}" 2>&1 | tee "$OUT/bench_glga_$b${TAG:-}.log" | grep -E "glga|error" | tail -4
  done
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  python3 -m eflow.cli.app bench attention --attn ${ATTN:-softmax,glga,sana,sla,vsa,tile} ${BENCH_SET:-} \
    --tokens ${TOKENS:-8k,32760,125000} --drop ${DROP:-0,0.75} --mode fwd,fwd+bwd \
    --heads ${HEADS:-12} --head-dim ${HEAD_DIM:-128} --batch 1 --dtype bf16 --warmup ${WARMUP:-3} --repeats ${REPEATS:-10} \
    --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
