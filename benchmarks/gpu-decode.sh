#!/usr/bin/env bash
# One device call for the decode kernel: its GPU tests, then `bench decode` (ours dense / paged / Quest-selected vs
# SDPA flash and compiled FlexAttention). Usage: benchmarks/gpu-decode.sh [tests|notests] [LENGTHS] [BATCHES]
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
if [ "${1:-tests}" != "notests" ]; then
  python3 -m pytest tests/gpu/test_gpu_decode.py -q -p no:cacheprovider --durations=5 2>&1 \
    | tee "$OUT/gpu-decode-tests.log" | tail -25
fi
python3 -m longattn.bench.decode decode --lengths "${2:-8k,16k,32k,64k,128k,256k,512k}" --batches "${3:-1,8}" \
  --out "$OUT/decode-gpu.jsonl" 2>&1 | tail -80
