#!/usr/bin/env bash
# Issue 11's comparison on the full shared HAM10000 copy (5,984 images, 8.2% melanoma, age/sex/site): the
# default with clinical metadata, the default image-only, a 5-fold ensemble of the metadata recipe, and plain
# cross-entropy; three seeds, one budget per model (siamese.budget_images; an ensemble's five members each get
# it). The first recipe is compared with each other one (paired patient bootstrap).
#   DEVICE=cuda (default): one `compare` process per seed side by side on the GPU, at 128 px, BUDGET 24000.
#   DEVICE=cpu: the seeds one after another, at 64 px, BUDGET 8000 (what fits a 2-core machine in about an hour).
# Then `compare --table-only` over the merged folders writes the table. Resumable: finished rows are kept.
# DATA may be a copy of the images resized to the training size (what travels to a lent GPU).
# LIMIT=SECONDS stops the training processes (SIGTERM) after that long.
set -euo pipefail
DATA=${DATA:-../shared/data/ham10000}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SEEDS=(${SEEDS:-0 1 2})
CONFIGS=(configs/default-clinical.yaml configs/default.yaml configs/default-clinical-5fold.yaml configs/plain-ce.yaml)
if [ "$DEVICE" = cuda ]; then SIZE=${SIZE:-128}; BUDGET=${BUDGET:-24000}; else SIZE=${SIZE:-64}; BUDGET=${BUDGET:-8000}; fi
RUNS=${RUNS:-runs/ham-clinical-$DEVICE}
COMMON=(--set model.backbone=resnet18 --set model.pretrained=none --set data.image_size=$SIZE
        --set siamese.backbone_lr_scale=1 --set siamese.epochs=100 --set siamese.val_reference_max=700
        --set siamese.budget_images=$BUDGET --set runtime.amp=off --set runtime.num_workers=2
        --no-progress --device "$DEVICE" ${EXTRA:-})
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
mkdir -p "$RUNS/parts"
pids=()
status=0
for seed in "${SEEDS[@]}"; do
  timeout --signal=TERM "${LIMIT:-0}" $PY -m melanoma_siamese compare --data "$DATA" --configs "${CONFIGS[@]}" \
    --seeds "$seed" --out "$RUNS/parts/seed$seed" "${COMMON[@]}" >"$RUNS/parts/seed$seed.log" 2>&1 & pids+=($!)
  if [ "$DEVICE" != cuda ]; then wait "${pids[-1]}" || status=1; fi
done
for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || status=1; done
$PY experiments/merge_parts.py "$RUNS/merged" "${SEEDS[@]/#/$RUNS/parts/seed}"
$PY -m melanoma_siamese compare --data "$DATA" --configs "${CONFIGS[@]}" --seeds "${SEEDS[@]}" --out "$RUNS/merged" \
  --table-only "${COMMON[@]}" || status=1
exit $status
