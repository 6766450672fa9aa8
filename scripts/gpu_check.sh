#!/usr/bin/env bash
# The GPU check: training throughput of rows 1 and 2 (AMP, channels_last, real input pipeline vs synthetic
# tensors), inference ms per batch of every row (fp32, fp16), search at MSMT17 gallery size, and a 300-step
# row-1 training whose loss must fall. Under 8 minutes on one GPU; writes gpu_check.json and gpu_check.md.
#
#   scripts/gpu_check.sh [OUT_DIR]                   # OUT_DIR defaults to gpu_check_out
#   GPU_CHECK_TINY=1 scripts/gpu_check.sh /tmp/out   # tiny sizes on the CPU (tests/test_bench_scripts.py)
#
# PYTHON picks the interpreter (default: python); AGW_CACHE the folder of the generated sets.
set -euo pipefail
out="${1:-gpu_check_out}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
args=(--out "$out" --cache "${AGW_CACHE:-$HOME/.cache/agw_light}/bench")
if [[ -n "${GPU_CHECK_TINY:-}" ]]; then
    args+=(--tiny --device cpu)
elif command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
exec "${PYTHON:-python}" "$here/gpu_check.py" "${args[@]}"
