# Sourced by scripts/gpu_sweep_bg.sh and scripts/gpu_repro_bg.sh on the lent GPU machine: a long job in
# its own process session, so that it outlives the device call that starts it while the machine stays
# warm, and a wait for it that the next call (within the warm period) can repeat.
#   bg_start DIR COMMAND...  set the machine up (scripts/gpu_setup.sh), then run COMMAND in the background
#                            with its output in DIR/job.log and its pid in DIR/pid
#   bg_wait DIR NAME         wait up to WAIT_S (540) seconds for it; say whether NAME finished
bg_start() {
  local dir=$1; shift
  source scripts/gpu_setup.sh || exit 1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  mkdir -p "$dir"
  setsid nohup "$@" > "$dir/job.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
}
bg_wait() {
  local dir=$1 name=$2 end=$(( $(date +%s) + ${WAIT_S:-540} ))
  while kill -0 "$(cat "$dir/pid")" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
  kill -0 "$(cat "$dir/pid")" 2>/dev/null && echo "$name still running" || echo "$name finished"
}
