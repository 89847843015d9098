#!/usr/bin/env bash
# GPU check of the inference core, prepared for a machine with one NVIDIA GPU; about 10 minutes.
#   1. installs what is missing (torch 2.13.0 and the project's worker+test extras) when it can;
#   2. writes a random mit-b5 stand-in (no download: the machine may have no internet);
#   3. runs the parity test with the pipeline on CUDA (fp32) against the model card on the CPU;
#   4. reports fp32 and bf16 agreement on CUDA for the whole parity corpus;
#   5. runs the stage benchmark on CUDA at batch sizes 1, 8 and 32;
#   6. runs the system benchmark on CUDA in bf16: the bare forward swept over batch sizes 1-64, then
#      N jobs through API -> Redis -> one worker (max batch = the best size) -> S3 (moto) -> status.
# Figures go to $OUT (default ./gpu-check-out). Exit status: non-zero when a step failed.
# The step timeouts add up to 9 minutes (540 s) when nothing needs installing.
#   usage: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT"
status=0
step() { echo; echo "== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi not found"

step "install (only what is missing)"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # PyPI's Linux wheel of torch 2.13.0 is the CUDA build; never an unpinned torch.
  timeout 300 "$PY" -m pip install -q "torch==2.13.0" || echo "could not install torch (offline?)"
fi
if ! timeout 60 "$PY" -c "import transformers, PIL, numpy, pytest, faceparse" 2>/dev/null; then
  timeout 300 "$PY" -m pip install -q -e '.[worker,test]' \
    || timeout 300 "$PY" -m pip install -q --no-deps -e . \
    || echo "could not install the project (offline?)"
fi
"$PY" - <<'EOF' || { echo "torch cannot see a CUDA device: stopping"; exit 2; }
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(0))
EOF

step "random b5 stand-in"
MODEL_DIR=$(mktemp -d)/b5
timeout 60 "$PY" -m faceparse.cli model init-random "$MODEL_DIR" --arch b5 || status=1

step "parity test, pipeline on CUDA fp32 (reference: model card on the CPU, fp32)"
FACEPARSE_TEST_DEVICE=cuda FACEPARSE_TEST_DTYPE=float32 timeout 90 \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_parity.py 2>&1 | tee "$OUT/parity-cuda.txt" \
  || status=1

step "agreement on CUDA, fp32 and bf16, b5 weights (reported; bf16 is not held to the fp32 bar)"
timeout 60 "$PY" -m bench.pipeline --parity --model "$MODEL_DIR" --device cuda \
  --json "$OUT/parity-b5.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/parity-b5.txt" || status=1

step "stage benchmark on CUDA (bf16), batch sizes 1, 8, 32"
timeout 90 "$PY" -m bench.pipeline --model "$MODEL_DIR" --device cuda --dtype auto \
  --sizes 512x512,1600x1200 --images 32 --batch-sizes 1,8,32 --repeats 1 --json "$OUT/bench-cuda.json" \
  2>&1 | grep -v "Loading weights" | tee "$OUT/bench-cuda.md" || status=1

step "system benchmark on CUDA (bf16): forward sweep 1-64, then 256 jobs end to end"
# moto's S3 server is one Python process: on a GPU it, not the device, may bound the system figure;
# the batch sizes the jobs rode in (printed) show whether the worker kept the device fed.
timeout 240 "$PY" -m bench.system --model "$MODEL_DIR" --device cuda --dtype bfloat16 --jobs 256 \
  --batch-sizes 1,2,4,8,16,32,64 --repeats 2 --json "$OUT/system-cuda.json" \
  2>&1 | grep -v "Loading weights" | tee "$OUT/system-cuda.txt" || status=1

step "done (status $status); figures in $OUT"
exit "$status"
