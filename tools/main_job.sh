#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, train Spatial-Mamba with the ImageNet trainer
# (classification/main.py) in NPROC processes through the distributed launcher, evaluate the best checkpoint again
# with --pretrained --eval, and print its top-1 and where the checkpoints, logs and training-curve plot are.
#
#   bash tools/main_job.sh            # embedded default: scikit-learn's digits as an ImageFolder, configs/digits_demo.yaml
#   bash tools/main_job.sh --data-path /imagenet --cfg classification/configs/spatialmamba/spatialmamba_tiny.yaml
#
# Every argument goes to classification/main.py (relative paths are relative to where you run this). Environment:
# NPROC processes (default 2), OUTPUT root (default output/main_job), TAG run name (default main_job), DIGITS_DIR
# and DIGITS_SIZE where and at what size the digits are written (default output/digits_imagefolder, 32 px),
# SKIP_SETUP=1 to use the existing .venv as it is. Running it again with the same TAG continues (auto-resume) rather
# than starting over. A short run (what the test suite does):
#   DIGITS_SIZE=16 bash tools/main_job.sh --opts DATA.IMG_SIZE 16 TRAIN.EPOCHS 2 TRAIN.WARMUP_EPOCHS 0
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${SKIP_SETUP:-0}" != "1" ]; then
  bash "$ROOT/tools/setup_env.sh"
fi
PY="$ROOT/.venv/bin/python"

NPROC="${NPROC:-2}"
OUTPUT="${OUTPUT:-$ROOT/output/main_job}"
TAG="${TAG:-main_job}"
CFG="$ROOT/configs/digits_demo.yaml"
DATA=""
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cfg) CFG="$2"; shift 2 ;;
    --cfg=*) CFG="${1#*=}"; shift ;;
    --data-path) DATA="$2"; shift 2 ;;
    --data-path=*) DATA="${1#*=}"; shift ;;
    --output) OUTPUT="$2"; shift 2 ;;
    --output=*) OUTPUT="${1#*=}"; shift ;;
    --tag) TAG="$2"; shift 2 ;;
    --tag=*) TAG="${1#*=}"; shift ;;
    *) PASS+=("$1"); shift ;;
  esac
done

if [ -z "$DATA" ]; then
  DATA="${DIGITS_DIR:-$ROOT/output/digits_imagefolder}"
  "$PY" "$ROOT/tools/make_digits_imagefolder.py" "$DATA" --size "${DIGITS_SIZE:-32}"
fi

START=$(date +%s)
echo "[main_job] training: $NPROC processes, config $CFG, data $DATA"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$ROOT/classification/main.py" \
  --cfg "$CFG" --data-path "$DATA" --output "$OUTPUT" --tag "$TAG" ${PASS[@]+"${PASS[@]}"}
TRAINED=$(date +%s)

# OUTPUT/<MODEL.NAME>/<TAG>: the run that was just written.
RUN="$(ls -td "$OUTPUT"/*/"$TAG" | head -n 1)"
echo "[main_job] evaluating $RUN/best_ckpt.pth with --pretrained --eval (one process)"
EVAL_LOG="$(mktemp)"
trap 'rm -f "$EVAL_LOG"' EXIT
"$PY" "$ROOT/classification/main.py" --cfg "$CFG" --data-path "$DATA" --output "$OUTPUT" --tag "$TAG-eval" \
  --pretrained "$RUN/best_ckpt.pth" --eval ${PASS[@]+"${PASS[@]}"} | tee "$EVAL_LOG"
END=$(date +%s)

line() { grep -o "Accuracy of the $1 on the [0-9]* test images: [0-9.]*%" "$EVAL_LOG" | tail -n 1; }
TOP1="$(line network | grep -o '[0-9.]*%$')"
IMAGES="$(line network | grep -o 'the [0-9]* test' | grep -o '[0-9]*')"
TOP1_EMA="$(line 'network ema' | grep -o '[0-9.]*%$' || true)"
cat <<EOF

================ main job done ================
top-1 of the best checkpoint (--pretrained --eval): $TOP1 on $IMAGES val images${TOP1_EMA:+ (its EMA weights: $TOP1_EMA)}
time: $((TRAINED - START)) s training, $((END - TRAINED)) s evaluation
checkpoints: $RUN/{best_ckpt.pth,best_ckpt_ema.pth,latest_ckpt.pth}
logs:        $RUN/log_rank*.txt (config: $RUN/config.json, TensorBoard: $RUN/tensorboard)
plot:        $RUN/training_curves.png
EOF
