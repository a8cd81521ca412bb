#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and TensorRT (TensorRT-RTX's CPU-only build path
# is not enough: this one runs engines). For each fmnist_vit engine, INT8 W8A8 and W4A8 and INT4
# weight-only W4A16, with the FP16 baseline engine beside each, it builds the engines, runs them
# through the report's `trt` and `trt-fp16` backends on the 10k Fashion-MNIST test set, gates
# agreement with the fake-quant model at >= 99%, and times them (host time, plus trtexec's GPU
# compute where trtexec is on PATH). Noise calibration keeps it under 8 minutes: it checks
# engine parity, not calibration quality.
#   scripts/gpu_check.sh            (OUT=DIR to choose where the run directories go)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
"$py" - <<'PY'
import importlib.util
import sys

def fail(message):
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(2)

try:
    import torch
except ImportError:
    fail("torch is not installed; run `make setup` (or install clamp-export) first")
if not torch.cuda.is_available():
    fail(f"torch {torch.__version__} sees no CUDA GPU; run this on a GPU machine")
if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is None:
    fail(
        "TensorRT is not installed, so no engine can run; pip install 'clamp-export[trt]' "
        "(NVIDIA's tensorrt wheels) on this GPU machine"
    )
PY
out=${OUT:-out/gpu_check}
for bits in w8a8 w4a8 w4a16; do
  "$py" -m clamp_export fmnist_vit --bits "$bits" --target trt --calib noise --eval-data fmnist \
    --backends torch-fakequant,torch-fp32,trt,trt-fp16 --batch 1,8,32,128 \
    --min-agreement 0.99 --out "$out/$bits"
done
echo "gpu_check: passed; reports in $out/*/report.html"
