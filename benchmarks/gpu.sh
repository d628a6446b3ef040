#!/usr/bin/env bash
# One device call: GPU tests (bf16/fp16, fwd+bwd) then the kernel benchmark. Usage: benchmarks/gpu.sh TESTS LENGTHS
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
mkdir -p "${OUT:-/tmp/out}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
if [ "${1:-tests}" != "notests" ]; then
  python3 -m pytest ${TESTS:-tests/gpu tests/kernels} -q -x -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
LENGTHS=${2:-64k}
python3 -m longattn.cli bench kernels --lengths "$LENGTHS" --patterns "${PATTERNS:-causal,sliding_window,sink_window,dilated,random_90,random_0}" \
  --out "$OUT/kernels-h100.jsonl" --plot "$OUT/kernels-h100.png" 2>&1 | grep -v "it/s\]" | tail -40
