#!/usr/bin/env bash
# On the lent GPU machine (device tool): a queue of commands run one after another on one GPU, in its own
# process session (scripts/gpu_bg.sh), so that a session's device time is used without gaps between calls
# and two queues can share a 2-GPU machine (one per GPU: speed measurements never share a GPU).
#   Q=g0 GPU=0 bash scripts/gpu_queue_bg.sh start 'bash scripts/gpu_check.sh' 'CASES=fm-off bash scripts/gpu_parallel.sh'
#   Q=g0 bash scripts/gpu_queue_bg.sh wait        # the next call, within the machine's warm period
# Each command runs with CUDA_VISIBLE_DEVICES=$GPU and OUT=/tmp/q_$Q/out/<its number>; the queue's log
# says when each started and ended and its exit status. `start` waits up to WAIT_S (540) like `wait`; both
# copy the queue's log and a tarball of its outputs (no weights) to $OUT/q_$Q.log and $OUT/q_$Q.tgz.
# Needs .whl/ (docs/benchmarks.md).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu_bg.sh
Q=${Q:?name the queue: Q=g0}
DIR=/tmp/q_$Q
if [ "${1:-start}" = start ]; then
  shift
  mkdir -p "$DIR/out"
  i=0
  for cmd in "$@"; do i=$((i + 1)); printf '%s\n' "$cmd" > "$DIR/cmd.$i"; done
  cat > "$DIR/run.sh" <<'EOF'
dir=$1; n=$2
for i in $(seq 1 "$n"); do
  cmd=$(cat "$dir/cmd.$i"); mkdir -p "$dir/out/$i"
  echo "== [$i/$n] $(date -u +%H:%M:%S) start: $cmd"
  OUT="$dir/out/$i" bash -c "$cmd"; rc=$?
  echo "== [$i/$n] $(date -u +%H:%M:%S) exit $rc: $cmd"
done
EOF
  CUDA_VISIBLE_DEVICES=${GPU:-0} bg_start "$DIR" bash "$DIR/run.sh" "$DIR" "$i"
fi
bg_wait "$DIR" "queue $Q"
grep -v "━" "$DIR/job.log" | grep -E "^== |passed|failed|it/s|GiB|error|Error" | tail -60
cp "$DIR/job.log" "$OUT/q_$Q.log"
tar czf "$OUT/q_$Q.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.distcp' -C "$DIR" out
