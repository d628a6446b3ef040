#!/usr/bin/env bash
# One device call per phase, everything written under $OUT. Usage: benchmarks/gpu-suite.sh PHASE [ARGS]
#   tests  [PYTEST PATHS]      all GPU tests (4 pytest workers share the GPU), log + junit XML
#   model  LENGTHS METHODS     `bench model`: random-weight Llama-3-8B-shaped prefill, dense cuDNN/flash vs methods
#   decode LENGTHS BATCHES     `bench decode`: one decode step, ours dense/paged/selected vs SDPA flash and Flex
#   linear LENGTHS             `bench linear` (MODES="decay none"): linear attention tokens/s at constant tokens vs cuDNN
#                              (and fla-core's chunk kernels when its wheel is carried in .whl/)
#   recall LENGTHS             `eval recall` (MQAR) on the GPU, one process per mixer, merged into recall.jsonl/.png
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (e.g. fla-core), installed beside the image's packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >"$OUT/nvidia-smi.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__, torch.cuda.get_device_name())'
phase=${1:-tests}
shift || true
case "$phase" in
  tests)
    timeout "${TEST_TIMEOUT:-540}" python3 -m pytest ${@:-tests/gpu} -q -p no:cacheprovider -n "${WORKERS:-4}" \
      --dist loadfile --durations=15 --junitxml="$OUT/gpu-tests.xml" -W ignore 2>&1 | tee "$OUT/gpu-tests.log" | tail -60 ;;
  model)
    python3 -m longattn.cli bench model --lengths "${1:-128k}" --methods "${2:-minference_vertical_slash,flexprefill}" \
      --reps "${REPS:-2}" --out "$OUT/model.jsonl" 2>&1 | grep -v "it/s\]" | tail -60 ;;
  decode)
    python3 -m longattn.cli bench decode --lengths "${1:-8k,32k,128k,512k}" --batches "${2:-1,8}" \
      --out "$OUT/decode.jsonl" 2>&1 | grep -v "it/s\]" | tail -60 ;;
  linear)
    python3 -m longattn.cli bench linear --lengths ${1:-4096 65536 1048576} --tokens 1048576 --heads 16 \
      --head-dim 128 --modes ${MODES:-decay none} --out "$OUT/linear.jsonl" 2>&1 | grep -v "it/s\]" | tail -60 ;;
  recall)  # one process per mixer (tiny models are launch-bound), then one merged JSONL, log and plot
    tmp=$(mktemp -d)
    for m in $(python3 -c 'from longattn.eval.recall import SWEEP; print(" ".join(SWEEP))'); do
      timeout "${RECALL_TIMEOUT:-480}" python3 -m longattn.cli eval recall --device auto --threads 1 \
        --lengths "${1:-256,512,1024}" --mixers "$m" --out "$tmp/$m.jsonl" >"$tmp/$m.log" 2>&1 &
    done
    wait
    cat "$tmp"/*.jsonl >"$OUT/recall.jsonl"; tail -n +1 "$tmp"/*.log >"$OUT/recall.log"
    python3 -c 'import json, sys; from pathlib import Path; from longattn.eval.recall import markdown_table, plot_rows
rows = [json.loads(line) for line in open(sys.argv[1])]; plot_rows(rows, Path(sys.argv[2])); print(markdown_table(rows))
' "$OUT/recall.jsonl" "$OUT/recall.png" ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
