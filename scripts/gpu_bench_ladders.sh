#!/usr/bin/env bash
# Run on the lent GPU machine (device tool, one H200): the training and sampling ladders of EFlow Fig. 4
# (`eflow bench train`, `eflow bench sample`; docs/benchmarks.md) at two sizes, given as token grids:
#   B:  16 x 32 x 48 tokens (24,576), training batch 4
#   XL: 21 x 30 x 52 tokens (32,760: 81 frames of 480 x 832 through the Wan 2.1 VAE), training batch 2
# Sampling runs at batch 1 (Fig. 4b is a latency); its decode uses a random-weight Wan 2.1 VAE when
# diffusers is importable (else the pixel autoencoder, which decodes for free: the log says so).
# Training uses the pixel autoencoder's 3-channel latents (random data; vs the VAE's 16 channels this
# changes only the patch embedding and the head, far below 0.1% of the FLOPs).
# Two more parts time the small runs of docs/results.md (B on 8x8x8 tokens, batch 32), eagerly and with
# per-block torch.compile (--compile): at that size a step is bound by the host's launches (aten ops
# per step on the CPU: FM + softmax 5.3k, the dense EFlow objective 9.7k, the defaults 14.5k), and
# fused blocks launch fewer kernels:
#   small_eager, small_compiled  rungs fm-softmax, sfm-mva, +pdg, +drop
# and XL with compiled blocks (issue 17's FM + softmax MFU target): train_XL_compiled; the same rung with 9
# heads of 128 instead of the paper's 16 of 72 (not the paper's model: what the head dim costs in MFU):
# train_XL_hd128. train_1p5B_ac: the 1.5B text-to-video preset (random 4096-d text embeddings) at XL's
# 32,760 tokens on one GPU with full activation checkpointing (issue 13's single-GPU target), batch 1.
# sample_XL_tile times a distilled student's sampler at XL (docs/distillation.md): 40x2-step FM, the
# 4-step segment sampler with softmax, and with the tile mask the B-size search chose in every block
# (1 reference frame, frame window 1).
# Needs the wheels the GPU image lacks in .whl/ (as scripts/gpu_attention.sh); writes results, logs and
# (with matplotlib) bar charts to $OUT/bench_ladders/<part>/. One part per call keeps each call short:
#   PARTS="train_B sample_B" bash scripts/gpu_bench_ladders.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; DEST="$OUT/bench_ladders"; mkdir -p "$DEST"
source scripts/gpu_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

VAE=()
if python3 -c "import diffusers" 2>/dev/null; then
  VAE=(--autoencoder wan --random-vae)
else
  echo "note: diffusers is not installed: the sampling ladder decodes with the pixel autoencoder (e2e = diffusion)"
fi
EFLOW="python3 -m eflow.cli.app"
B=(--preset B --grid 16x32x48)
XL=(--preset XL --grid 21x30x52)
SMALL=(--preset B --frames 8 --size 16 --batch-size 32 --rung "${SMALL_RUNGS:-fm-softmax,sfm-mva,+pdg,+drop}" --steps 20 --warmup 8)

ladder() {  # ladder PART bench-args...: run one ladder into $DEST/PART, log beside it
  local part=$1; shift
  echo "== $part: eflow bench $*"
  $EFLOW bench "$@" --out "$DEST/$part" 2>&1 | tee "$DEST/$part.log" | tail -25
}

for part in ${PARTS:-train_B sample_B train_XL sample_XL}; do
  case $part in
    train_B) ladder "$part" train "${B[@]}" --batch-size 4 --steps "${STEPS_B:-10}" --warmup "${WARMUP:-3}" ;;
    sample_B) ladder "$part" sample "${B[@]}" "${VAE[@]}" --batch-size 1 --repeats "${REPEATS:-3}" --warmup 1 ;;
    train_XL) ladder "$part" train "${XL[@]}" --batch-size 2 --steps "${STEPS_XL:-5}" --warmup "${WARMUP:-3}" ;;
    sample_XL) ladder "$part" sample "${XL[@]}" "${VAE[@]}" --batch-size 1 --repeats "${REPEATS_XL:-2}" --warmup 1 ;;
    small_eager) ladder "$part" train "${SMALL[@]}" ;;
    small_compiled) ladder "$part" train "${SMALL[@]}" --compile ;;
    train_XL_compiled) ladder "$part" train "${XL[@]}" --batch-size 2 --steps "${STEPS_XL:-5}" --warmup 5 --compile ;;
    train_XL_hd128) ladder "$part" train "${XL[@]}" --batch-size 2 --steps "${STEPS_XL:-5}" --warmup 5 --compile \
      --rung fm-softmax --set model.overrides.heads=9 ;;
    train_1p5B_ac) ladder "$part" train --preset 1.5B --grid 21x30x52 --batch-size 1 --steps 3 --warmup 2 --ac full \
      --rung fm-softmax,sfm-mva,+drop ;;
    sample_XL_tile) ladder "$part" sample "${XL[@]}" "${VAE[@]}" --batch-size 1 --repeats "${REPEATS_XL:-2}" --warmup 1 \
      --rung fm-softmax-40x2 --rung 'name=segment-softmax-4,base=fm-softmax-40x2,sampler=segment,steps=4' \
      --rung 'name=segment-tile-4,base=fm-softmax-40x2,attn=tile,sampler=segment,steps=4' \
      --set model.attention=tile --set 'model.attention_options={reference_frames=1,frame_window=1}' ;;
    *) echo "unknown part '$part'; choices: train_B sample_B train_XL sample_XL small_eager small_compiled train_XL_compiled train_XL_hd128 train_1p5B_ac sample_XL_tile"; exit 2 ;;
  esac
done
