#!/usr/bin/env bash
# Run on the lent GPU machine (device tool, one H200): peak memory and it/s of `eflow train` steps at the
# XL preset, 21 x 30 x 52 latent tokens (32,760: 81 frames of 480 x 832 through the Wan 2.1 VAE), batch
# 2, under each [parallel] setting of docs/scaling.md: ac off / full / selective, compile off / on, for
#   fm     flow matching, softmax attention, no token dropping (the Wan-style baseline)
#   eflow  the EFlow recipe's dense stage: pdg-sfm + MVA (share 0.25), GLGA, no dropping
# The clips are the shapes dataset at 21 x 60 x 104 pixels with the pixel autoencoder (its latent grid is
# the pixel grid, so XL's 1x2x2 patch makes 21 x 30 x 52 tokens; 3 channels instead of the VAE's 16
# change only the patch embedding and the head). Each case is its own process (a clean CUDA peak) running
# the real Trainer (eflow_core/train/trainer.py) for STEPS steps with saving and previews switched off.
# it/s: median over the steps after the first WARMUP (compilation happens there); peak_gb: the largest
# mem_gb (torch.cuda.max_memory_allocated) of the run. Writes $OUT/gpu_parallel/summary.tsv, one
# metrics file and log per case. A case takes ~1-3 min (compile cases longer): run a few per call, e.g.
#   CASES="fm-off fm-full fm-selective" bash scripts/gpu_parallel.sh
#   CASES="fm-off-compile fm-full-compile fm-selective-compile" bash scripts/gpu_parallel.sh
#   CASES="eflow-off eflow-full eflow-selective" bash scripts/gpu_parallel.sh
#   CASES="eflow-off-compile eflow-full-compile eflow-selective-compile" bash scripts/gpu_parallel.sh
# GLGA_OPTIONS (JSON) sets the eflow cases' model.attention_options and TAG suffixes the case names, e.g.
#   TORCH_LOGS=graph_breaks,recompiles CASES=eflow-selective-compile GLGA_OPTIONS='{"gate_fn": "softmax"}' \
#     TAG=-gsoftmax bash scripts/gpu_parallel.sh
# PRESET sets the model preset (default XL); INDUCTOR (JSON) sets torch._inductor.config fields;
# MIX_ORDER=on keeps Inductor's mix-order reduction on in compiled runs (eflow switches it off: the
# likely cause of the compiled XL gradient failure, docs/scaling.md), to show the failing state, e.g.
#   STEPS=6 MIX_ORDER=on TAG=-mixorder CASES=eflow-off-compile bash scripts/gpu_parallel.sh
#   PRESET=B INDUCTOR='{"split_reductions": false}' TAG=-B-nosplit CASES=eflow-off-compile bash scripts/gpu_parallel.sh
# Each case's grad norms per step are printed (compare a compile case with its eager case).
# Needs the wheels the GPU image lacks in .whl/ (as scripts/gpu_attention.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; DEST="$OUT/gpu_parallel"; mkdir -p "$DEST"
source scripts/gpu_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
[ -f "$DEST/summary.tsv" ] || printf 'case\tsteps\tit_s\tpeak_gb\tstatus\n' > "$DEST/summary.tsv"

ALL="fm-off fm-full fm-selective fm-off-compile fm-full-compile fm-selective-compile"
ALL="$ALL eflow-off eflow-full eflow-selective eflow-off-compile eflow-full-compile eflow-selective-compile"
for case in ${CASES:-$ALL}; do
  echo "== $case"
  CASE=$case STEPS=${STEPS:-10} WARMUP=${WARMUP:-3} DEST=$DEST python3 - <<'EOF' 2>&1 | tee "$DEST/$case${TAG:-}.log" | tail -5
import json, os, statistics, shutil
import torch._inductor.config
for key, value in json.loads(os.environ.get("INDUCTOR") or "{}").items():
    setattr(torch._inductor.config, key, value)
from eflow.config import build_config
import eflow.parallel.parallelize as parallelize_module
from eflow.train.trainer import Trainer

if os.environ.get("MIX_ORDER") == "on":
    parallelize_module.inductor_options = lambda: {}  # Inductor's defaults, as before 2026-12-01

case, dest, tag = os.environ["CASE"], os.environ["DEST"], os.environ.get("TAG", "")
steps, warmup = int(os.environ["STEPS"]), int(os.environ["WARMUP"])
recipe, ac, *rest = case.split("-")
dense = [{"start": 0.0, "end": 1.0, "drop_ratio": 0.0, "mva_share": 0.25 if recipe == "eflow" else 0.0}]
layers = {
    "fm": {"model": {"attention": "softmax"}, "objective": {"name": "fm", "options": {}},
           "token_drop": {"name": "none"}, "schedule": {"stages": dense}},
    "eflow": {"model": {"attention": "glga", "attention_options": json.loads(os.environ.get("GLGA_OPTIONS") or "{}")},
              "objective": {"name": "pdg-sfm", "options": {"mva": True}},
              "schedule": {"stages": dense}},
}[recipe]
run = f"/tmp/gpu_parallel/{case}{tag}"
shutil.rmtree(run, ignore_errors=True)
cfg = build_config(layers, {
    "model": {"preset": os.environ.get("PRESET") or "XL"},
    "data": {"frames": 21, "height": 60, "width": 104},
    "train": {"batch_size": 2, "steps": steps, "save_every": 0, "preview_every": 0, "out": run,
              "device": "cuda", "precision": "bf16"},
    "parallel": {"ac": ac, "compile": rest == ["compile"]},
})
Trainer.save = lambda self, step: None  # timing only: no checkpoint, no preview
Trainer.preview = lambda self, step: None
status = "ok"
try:
    Trainer(cfg, progress=False).run()
except Exception as err:  # an OOM is a result too
    status = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")] if os.path.exists(f"{run}/metrics.jsonl") else []
shutil.copy(f"{run}/metrics.jsonl", f"{dest}/{case}{tag}.jsonl") if records else None
timed = [r["it_s"] for r in records[warmup:]]
it_s = statistics.median(timed) if timed else float("nan")
peak = max((r.get("mem_gb", float("nan")) for r in records), default=float("nan"))
print(f"{case}{tag}: grad norms", " ".join(f"{r['grad_norm']:.4g}" for r in records))
print(f"{case}{tag}: {it_s:.3f} it/s, peak {peak:.1f} GiB, {status}")
with open(f"{dest}/summary.tsv", "a") as f:
    f.write(f"{case}{tag}\t{len(records)}\t{it_s:.4f}\t{peak:.2f}\t{status}\n")
EOF
done
column -t -s $'\t' "$DEST/summary.tsv" 2>/dev/null || cat "$DEST/summary.tsv"  # no column(1) on the GPU image
