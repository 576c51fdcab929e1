#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) with its environment logged next to the
# results: `bash bench/gpu.sh [--tiny] [gpu.py flags]`. Writes to $OUT (the
# device machine's output folder) or bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
log="$OUT/gpu_log.txt"
{
  echo "# $(date -u +%FT%TZ) bash bench/gpu.sh $*"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$log"
# Let XLA take most of the GPU's memory up front (one process, no sharing).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export PYTHONUNBUFFERED=1
python3 -m bench.gpu --out "$OUT/gpu_results.jsonl" "$@" 2>&1 | tee -a "$log"
