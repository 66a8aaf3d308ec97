#!/usr/bin/env bash
# One round on a lent CUDA GPU (H100/H200, torch preinstalled, no network), under 10 minutes, for issue 13
# (prediction and serving on the GPU) and issue 9 point 7 (torch.compile on and off; GPU resume with the
# cuDNN autotuner off):
#   1. `bench --gpu`: the input pipeline, our training step against the model-only step and against the
#      reference's way, torch.compile on and off, `predict` on 1,000 JPEG files against the model alone,
#      and the server batched against one request per forward pass with 1, 8 and 32 clients;
#   2. tests/test_resume.py's SIGKILL-then-resume tests of the sampled-triplet recipe and of training under
#      torch.compile (run first), which train on the GPU there.
# Everything is written to $OUT: env.txt, bench-gpu.json/.txt, resume.txt, summary.txt.
#
# The project is not installed there: PYTHONPATH=src. Packages the machine lacks (pytorch-metric-learning,
# fastapi, starlette, pydantic, pydantic-core, annotated-types, typing-inspection, uvicorn, python-multipart,
# opentelemetry-api: fastapi 0.165 imports it)
# are installed from .gpu-wheels/ when it is carried (cp312 manylinux wheels).
#
# CPU=1 tries the same steps on a machine without a GPU, tiny: the CPU bench instead of --gpu, and the
# resume tests only collected (they take minutes on a CPU). Here: CPU=1 PY=.venv/bin/python OUT=/tmp/round
# bash experiments/gpu_round.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-round}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
started=$SECONDS
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

# Wheels only for what does not import (a package the machine has stays as it is).
$PY - <<'EOF' >"$OUT/wheels.txt" 2>&1
import glob, importlib.util, subprocess, sys
wanted = {"pytorch_metric_learning": "pytorch_metric_learning", "fastapi": "fastapi", "starlette": "starlette",
          "pydantic": "pydantic", "pydantic_core": "pydantic_core", "annotated_types": "annotated_types",
          "typing_inspection": "typing_inspection", "uvicorn": "uvicorn", "multipart": "python_multipart",
          "annotated_doc": "annotated_doc", "opentelemetry": "opentelemetry_api"}
if importlib.util.find_spec("torch") is None:  # not the Python this round is for: install nothing into it
    sys.exit(f"{sys.executable} has no torch; set PY to the Python that holds PyTorch")
missing = [wheel for module, wheel in wanted.items() if importlib.util.find_spec(module) is None]
files = [f for w in missing for f in glob.glob(f".gpu-wheels/{w}-*.whl")]
print("missing:", missing or "none", "| wheels found:", files)
if files:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *files], check=False)
EOF
$PY - <<'EOF' >"$OUT/env.txt" 2>&1
import os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "cpus", os.cpu_count())
for module in ("torchvision", "numpy", "pandas", "sklearn", "pytorch_metric_learning", "fastapi", "uvicorn",
               "multipart", "httpx", "onnxruntime", "pytest"):
    try:
        print(module, __import__(module).__version__)
    except Exception as exc:  # report, go on
        print(module, "MISSING", type(exc).__name__, exc)
EOF
cat "$OUT/wheels.txt" "$OUT/env.txt"

if [ "${CPU:-0}" = 1 ]; then
  BENCH=(bench --images 48 --size 64 --backbone resnet18 --pipeline-images 96 --pass-images 8 --embed-batch 8
         --embed-batches 1 --memory-steps 1 --memory-batch 8 --predict-images 32 --predict-batch 16 --serve-requests 16)
  RESUME=(--collect-only)
else
  BENCH=(bench --gpu)
  RESUME=()
fi
# First the resume checks (short; the sampled-triplet recipe is the one that broke with the autotuner on, and
# the compiled one has run on a CPU only), then the bench with the time left: it logs each measurement as it goes.
timeout 260 $PY -m pytest -q -p no:cacheprovider tests/test_resume.py -k "sigkill and (sampled or compiled)" \
  "${RESUME[@]}" >"$OUT/resume.txt" 2>&1
summary "resume (cuDNN autotuner off; sampled triplets with workers, and in-batch under torch.compile; SIGKILL" \
  "mid-epoch then --resume, bit-exact): exit $? after $((SECONDS - started)) s"
tail -15 "$OUT/resume.txt"

WORK=$(mktemp -d)  # generated data and the servers' logs: not brought back
left=$((${ROUND_SECONDS:-560} - (SECONDS - started)))  # ROUND_SECONDS: the whole round's time
timeout "$left" $PY -m melanoma_siamese "${BENCH[@]}" --work "$WORK" --json "$OUT/bench-gpu.json" \
  >"$OUT/bench-gpu.txt" 2>&1
summary "bench: exit $? after $((SECONDS - started)) s (124: stopped at the time limit; bench-gpu.txt has what was measured)"
tail -45 "$OUT/bench-gpu.txt"
summary "total $((SECONDS - started)) s"
