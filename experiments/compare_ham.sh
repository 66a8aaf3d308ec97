#!/usr/bin/env bash
# The README's comparison on the shared real sample, on this 2-core CPU: ResNet-18 from scratch at
# 128 px, a budget of 12 passes over the training part, at the sample's prevalence and at 5%.
# Resumable: rerun it and finished (recipe, seed) rows are kept.
set -euo pipefail
DATA=${DATA:-../shared/data/ham10000-sample}
BIN=${BIN:-.venv/bin/melanoma-siamese}
COMMON=(--set model.backbone=resnet18 --set model.pretrained=none --set data.image_size=128
        --set siamese.backbone_lr_scale=1 --set siamese.epochs=100 --set siamese.val_reference_max=700
        --no-progress --device cpu)
CONFIGS=(configs/default.yaml configs/reference.yaml configs/plain-ce.yaml configs/default-no-head.yaml)
seeds=()
for seed in ${SEEDS:-0 1 2}; do
  seeds+=("$seed")
  # 1,400 training images x 12 passes
  $BIN compare --data "$DATA" --configs "${CONFIGS[@]}" --seeds "${seeds[@]}" --out runs/compare-ham \
    --set siamese.budget_images=16800 "${COMMON[@]}"
  # 5% melanoma in the training part: about 1,110 training images x 12 passes
  $BIN compare --data "$DATA" --configs "${CONFIGS[@]}" --seeds "${seeds[@]}" --out runs/compare-ham-5pct \
    --set siamese.budget_images=13300 --set data.train_melanoma_fraction=0.05 "${COMMON[@]}"
done
