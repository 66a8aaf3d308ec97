#!/usr/bin/env bash
# compare_ham.sh's comparison on one CUDA GPU: the same recipes, overrides, budgets and split, with one
# `compare` process per (prevalence, seed) side by side on the GPU, then `compare` over the merged
# folders (--table-only: it trains nothing) writes each table and its paired bootstrap.
# fp32 (runtime.amp=off) as on the CPU; each process gets 2 CPU threads. LIMIT=SECONDS stops the
# training processes (SIGTERM) after that long; the rows they finished are tabulated.
set -euo pipefail
DATA=${DATA:-../shared/data/ham10000-sample}
PY=${PY:-python3}
RUNS=${RUNS:-runs}
SEEDS=(${SEEDS:-0 1 2})
CONFIGS=(configs/default.yaml configs/reference.yaml configs/plain-ce.yaml configs/default-no-head.yaml)
COMMON=(--set model.backbone=resnet18 --set model.pretrained=none --set data.image_size=128
        --set siamese.backbone_lr_scale=1 --set siamese.epochs=100 --set siamese.val_reference_max=700
        --set runtime.amp=off --set runtime.num_workers=2 --no-progress --device "${DEVICE:-cuda}"
        ${EXTRA:-})  # EXTRA: more overrides, last (a tiny trial: EXTRA="--set siamese.budget_images=64" DEVICE=cpu)
NATURAL=(--set siamese.budget_images=16800)
FIVE=(--set siamese.budget_images=13300 --set data.train_melanoma_fraction=0.05)
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
run() {  # name, seed, extra overrides...
  local name=$1 seed=$2
  shift 2
  timeout --signal=TERM "${LIMIT:-0}" \
    $PY -m melanoma_siamese compare --data "$DATA" --configs "${CONFIGS[@]}" --seeds "$seed" \
    --out "$RUNS/parts/$name-seed$seed" "$@" "${COMMON[@]}" >"$RUNS/parts/$name-seed$seed.log" 2>&1
}
mkdir -p "$RUNS/parts"
pids=()
for seed in "${SEEDS[@]}"; do
  run gpu-ham "$seed" "${NATURAL[@]}" & pids+=($!)
  run gpu-ham-5pct "$seed" "${FIVE[@]}" & pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
# Merge: run folders side by side, runs.csv rows concatenated; compare then trains nothing.
for name in gpu-ham gpu-ham-5pct; do
  $PY experiments/merge_parts.py "$RUNS/$name" "${SEEDS[@]/#/$RUNS/parts/$name-seed}"
done
$PY -m melanoma_siamese compare --data "$DATA" --configs "${CONFIGS[@]}" --seeds "${SEEDS[@]}" --out "$RUNS/gpu-ham" \
  --table-only "${NATURAL[@]}" "${COMMON[@]}" || status=1
$PY -m melanoma_siamese compare --data "$DATA" --configs "${CONFIGS[@]}" --seeds "${SEEDS[@]}" \
  --out "$RUNS/gpu-ham-5pct" --table-only "${FIVE[@]}" "${COMMON[@]}" || status=1
exit $status
