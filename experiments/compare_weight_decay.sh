#!/usr/bin/env bash
# Issue 9, point 2: weight decay on the matrices and kernels only (configs/default.yaml,
# siamese.decay_norm_and_bias false) against weight decay on every parameter, norm scales and biases
# included (experiments/configs/default-decay-all.yaml), on the shared real sample, on the 2-core CPU:
# ResNet-18 from scratch at 64 px, 5,600 training images (4 passes over the 1,400-image training part),
# seeds 0 1 2: about 8 minutes a run on the 2-core VM while other work held it (load average 5-7). The
# brief's 96 px and 8,400 images took 2 minutes an epoch there at load 4 and 4.7 at load 7, which would
# not have fit 6 runs in 45 minutes; IMAGE_SIZE=96 BUDGET=8400 asks for that budget on an idle machine.
#   experiments/compare_weight_decay.sh                    # the recipes' weight_decay (1e-4)
#   WEIGHT_DECAY=0.05 experiments/compare_weight_decay.sh  # the same pair at weight_decay 0.05
# Resumable: rerun it and finished (recipe, seed) rows are kept.
set -euo pipefail
DATA=${DATA:-../shared/data/ham10000-sample}
BIN=${BIN:-.venv/bin/melanoma-siamese}
BUDGET=${BUDGET:-5600}
IMAGE_SIZE=${IMAGE_SIZE:-64}
OUT=runs/compare-wd
EXTRA=()
if [[ -n "${WEIGHT_DECAY:-}" ]]; then
  OUT=runs/compare-wd-$WEIGHT_DECAY
  EXTRA=(--set "siamese.weight_decay=$WEIGHT_DECAY")
fi
read -r -a SEED_LIST <<< "${SEEDS:-0 1 2}"
$BIN compare --data "$DATA" --configs configs/default.yaml experiments/configs/default-decay-all.yaml \
  --seeds "${SEED_LIST[@]}" --out "${OUT_DIR:-$OUT}" \
  --set model.backbone=resnet18 --set model.pretrained=none --set data.image_size="$IMAGE_SIZE" \
  --set siamese.backbone_lr_scale=1 --set siamese.epochs=100 --set siamese.val_reference_max=700 \
  --set siamese.budget_images="$BUDGET" "${EXTRA[@]}" --no-progress --device cpu
