#!/usr/bin/env bash
# On the lent 2-GPU machine (device tool, nvidia-h200-x2): the two-GPU numbers of docs/scaling.md and
# docs/data-latents.md, each part a comparison of one GPU against two in the same call:
#   sp      Ulysses SP smoke test of the NCCL path: train the EFlow recipe (B, 20 steps) with --sp 2 under
#           torchrun, then sample it with --sp 2
#   sp_xl   4-step sampling of an XL run (one training step) at 30 x 52 x 80 = 124,800 tokens with one
#           process and with `--sp 2` on two: generation time and the largest frame difference
#   fsdp    FM + softmax at XL, 8 x 16 x 32 tokens, global batch 8: one GPU against FSDP2 on two
#           (batch 4 each): median it/s after the warm-up steps, peak memory, the losses side by side;
#           FSDP_FLAGS adds flags to the 2-GPU run (e.g. "--set parallel.fsdp_reshard_after_forward=true")
#   fsdp_sfm  the EFlow recipe under FSDP gathered once per step (ranks make different model calls; on
#           torch 2.11 the unused-parameter zero gradients of eflow.parallel.fsdp) with the sharded EMA
#           (gathered for MVA's targets and rank 0's previews, saved through DCP): that it runs, its
#           speed and peak memory, and its losses against one GPU's (the draws do not depend on the
#           world size, so they differ by bf16 rounding only)
#   encode  `eflow data encode` with a random-weight Wan 2.1 VAE (the real architecture, no weights
#           needed for timing) on ENC_CLIPS (256) shapes clips of 33 x 256 x 256, read by ENC_WORKERS (0)
#           DataLoader workers per process: one process against torchrun on two; the shards must be
#           byte-identical
# PARTS="sp sp_xl fsdp fsdp_sfm encode" (default all). Results in $OUT/multi/ (summary.txt and the logs).
set -uo pipefail
source scripts/gpu_setup.sh || exit 1
DEST="$OUT/multi"; mkdir -p "$DEST"; SUM="$DEST/summary.txt"
EFLOW="python3 -m eflow.cli.app"
TORCHRUN="torchrun --standalone --nproc-per-node 2 -m eflow.cli.app"
now() { date +%s.%N; }
took() { python3 -c "print(f'{$2 - $1:.1f}')"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$SUM"

for part in ${PARTS:-sp sp_xl fsdp fsdp_sfm encode}; do
case $part in
sp)
  echo "== sp: EFlow recipe, B, --sp 2, 20 steps (NCCL)" | tee -a "$SUM"
  $TORCHRUN train --preset B --size 16 --frames 8 --batch-size 8 --steps 20 --sp 2 --out /tmp/sp_b \
    --overwrite --set train.preview_every=0 > "$DEST/sp_train.log" 2>&1
  echo "rc $? $(tail -1 "$DEST/sp_train.log")" | tee -a "$SUM"
  $TORCHRUN sample /tmp/sp_b --sp 2 --steps 4 -n 4 --out /tmp/sp_b/s2 > "$DEST/sp_b_sample.log" 2>&1
  echo "sample --sp 2 rc $?" | tee -a "$SUM"
  ;;
sp_xl)
  echo "== sp_xl: XL, FM + softmax, 30 x 104 x 160 pixels = 124,800 tokens, 4-step Euler + CFG" | tee -a "$SUM"
  $EFLOW train --preset XL --frames 30 --size 104x160 --batch-size 1 --steps 1 --objective fm \
    --attn softmax --token-drop none --ac full --out /tmp/sp_xl --overwrite \
    --set train.preview_every=0 > "$DEST/sp_xl_train.log" 2>&1 || { tail -5 "$DEST/sp_xl_train.log"; }
  echo "$(date +%T) trained and saved the XL run (the first attempt ran out of its call here)" | tee -a "$SUM"
  for n in 1 2; do  # the sample command reports its generation time ("in X s"); wall time includes loading
    if [ $n = 1 ]; then run="$EFLOW sample /tmp/sp_xl"; else run="$TORCHRUN sample /tmp/sp_xl --sp 2"; fi
    t0=$(now); $run --steps 4 -n 1 --out /tmp/sp_xl/s$n > "$DEST/sp_xl_s$n.log" 2>&1; r=$?; t1=$(now)
    echo "$n GPU(s): rc $r, wall $(took "$t0" "$t1") s, $(grep -o 'in [0-9.]* s' "$DEST/sp_xl_s$n.log")" | tee -a "$SUM"
  done
  python3 - <<'EOF' 2>&1 | tee -a "$SUM"
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f"/tmp/sp_xl/{d}/samples.png")).astype(int) for d in ("s1", "s2"))
print(f"frame grids: shape {a.shape}, largest difference {np.abs(a - b).max()} (uint8 levels), mean {np.abs(a - b).mean():.3f}")
EOF
  ;;
fsdp)
  echo "== fsdp: XL, FM + softmax, 8 x 32 x 64 pixels (4,096 tokens), global batch 8, 15 steps" | tee -a "$SUM"
  FLAGS="--preset XL --frames 8 --size 32x64 --batch-size 8 --steps 15 --objective fm --attn softmax
    --token-drop none --set train.preview_every=0 --set train.save_every=0"
  $EFLOW train $FLAGS --out /tmp/fsdp1 --overwrite > "$DEST/fsdp1.log" 2>&1; echo "1 GPU rc $?" | tee -a "$SUM"
  $TORCHRUN train $FLAGS --fsdp ${FSDP_FLAGS:-} --out /tmp/fsdp2 --overwrite > "$DEST/fsdp2.log" 2>&1; echo "2 GPUs rc $?" | tee -a "$SUM"
  cp /tmp/fsdp1/metrics.jsonl "$DEST/fsdp1.jsonl"; cp /tmp/fsdp2/metrics.jsonl "$DEST/fsdp2.jsonl"
  python3 - <<'EOF' 2>&1 | tee -a "$SUM"
import json, statistics
runs = {n: [json.loads(l) for l in open(f"/tmp/{n}/metrics.jsonl")] for n in ("fsdp1", "fsdp2")}
speed = {n: statistics.median(r["it_s"] for r in rs[5:]) for n, rs in runs.items()}
for n, rs in runs.items():
    print(f"{n}: median it/s (steps 6-15) {speed[n]:.3f}, peak {max(r.get('mem_gb', 0) for r in rs):.1f} GiB")
print(f"speed-up 2 GPUs / 1 GPU: {speed['fsdp2'] / speed['fsdp1']:.2f}x")
print("losses:", [(round(a["loss"], 4), round(b["loss"], 4)) for a, b in zip(runs["fsdp1"], runs["fsdp2"])])
EOF
  ;;
fsdp_sfm)
  echo "== fsdp_sfm: the EFlow recipe (pdg-sfm + MVA, GLGA, SPRINT) at B under FSDP gathered once per step" | tee -a "$SUM"
  # previews at step 10 and 20 and a checkpoint at 15: the sharded EMA gathered for rank 0, and saved through DCP
  FLAGS="--preset B --size 32 --frames 8 --batch-size 16 --steps 30 --set train.preview_every=10 --set train.save_every=15"
  $EFLOW train $FLAGS --out /tmp/sfm1 --overwrite > "$DEST/fsdp_sfm1.log" 2>&1; echo "1 GPU rc $?" | tee -a "$SUM"
  $TORCHRUN train $FLAGS --fsdp --out /tmp/sfm2 --overwrite > "$DEST/fsdp_sfm2.log" 2>&1; echo "2 GPUs rc $?" | tee -a "$SUM"
  python3 - <<'EOF' 2>&1 | tee -a "$SUM"
import json
runs = {n: [json.loads(l) for l in open(f"/tmp/{n}/metrics.jsonl")] for n in ("sfm1", "sfm2")}
for n, rs in runs.items():
    print(f"{n}: {len(rs)} steps, last loss {rs[-1]['loss']:.4f}, mean of the last 10 {sum(r['loss'] for r in rs[-10:]) / 10:.4f}, "
          f"median it/s {sorted(r['it_s'] for r in rs[5:])[len(rs[5:]) // 2]:.2f}, peak {max(r.get('mem_gb', 0) for r in rs):.2f} GiB")
EOF
  ls /tmp/sfm2/samples /tmp/sfm2/checkpoints 2>&1 | tee -a "$SUM"
  ;;
encode)
  echo "== encode: random-weight Wan 2.1 VAE, ${ENC_CLIPS:=256} shapes clips of 33 x 256 x 256, shards of 16, ${ENC_WORKERS:=0} workers" | tee -a "$SUM"
  python3 - <<'EOF'
import diffusers, torch
torch.manual_seed(0)
diffusers.AutoencoderKLWan().save_pretrained("/tmp/wan_random")  # Wan 2.1's architecture and normalization
EOF
  ENC="data encode --data shapes --frames 33 --size 256 --limit $ENC_CLIPS --shard-size 16 --batch-size 8
    --workers $ENC_WORKERS --autoencoder wan --vae-path /tmp/wan_random"
  t0=$(now); $EFLOW $ENC --out /tmp/enc1 > "$DEST/encode1.log" 2>&1; r=$?; t1=$(now)
  echo "1 GPU: rc $r, wall $(took "$t0" "$t1") s, $(grep -o 'encoded [0-9]* in [0-9.]* s' "$DEST/encode1.log")" | tee -a "$SUM"
  t0=$(now); $TORCHRUN $ENC --out /tmp/enc2 > "$DEST/encode2.log" 2>&1; r=$?; t1=$(now)
  echo "2 GPUs: rc $r, wall $(took "$t0" "$t1") s, $(grep -o 'encoded [0-9]* in [0-9.]* s' "$DEST/encode2.log")" | tee -a "$SUM"
  same=$(cd /tmp/enc1 && for f in index.json shard-*.safetensors; do cmp -s "$f" "/tmp/enc2/$f" || echo "$f"; done)
  echo "files that differ: ${same:-none} ($(ls /tmp/enc1 | wc -l) files)" | tee -a "$SUM"
  ;;
esac
done
cat "$SUM"
