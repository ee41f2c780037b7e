#!/usr/bin/env bash
# On a CPU machine with no screen: PNG screenshots of TensorBoard's Scalars and Images pages for a run
# trained with --track tensorboard (docs/cli.md's pictures), through headless Chromium. Installs
# Debian's chromium when it is missing (root) and tensorboard from the `track` extra.
#   bash scripts/tensorboard_screenshot.sh RUN_DIR [OUT_DIR]   # writes OUT_DIR/tensorboard_{scalars,images}.png
set -euo pipefail
RUN=${1:?give a run directory trained with --track tensorboard}; DEST=${2:-$RUN/plots}; PORT=${PORT:-6006}
[ -d "$RUN/tensorboard" ] || { echo "error: $RUN/tensorboard not found: train with --track tensorboard" >&2; exit 2; }
command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null
python3 -c "import tensorboard" 2>/dev/null || python3 -m pip install -q tensorboard
mkdir -p "$DEST"
python3 -m tensorboard.main --logdir_spec "$(basename "$RUN"):$RUN/tensorboard" --port "$PORT" --host 127.0.0.1 \
  > "$DEST/tensorboard.log" 2>&1 &
TB=$!; trap 'kill $TB 2>/dev/null' EXIT
for _ in $(seq 30); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 1; done
shot() {  # shot PAGE FILE: one page, given 20 s of virtual time to load and draw
  chromium --headless --no-sandbox --enable-unsafe-swiftshader --use-angle=swiftshader --disable-quic \
    --no-first-run --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d)" --window-size=1500,1000 --virtual-time-budget=20000 \
    --screenshot="$1" "http://127.0.0.1:$PORT/?darkMode=false#$2" 2>/dev/null | grep -v "^$" || true
}
shot "$DEST/tensorboard_scalars.png" "scalars&tagFilter=loss%7Cval_%7Clr%7Cit_s"
shot "$DEST/tensorboard_images.png" "images"
ls -la "$DEST"/tensorboard_*.png
