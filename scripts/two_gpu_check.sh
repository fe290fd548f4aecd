#!/usr/bin/env bash
# The two-GPU check of context parallelism: the distributed tests over NCCL (one GPU per
# process), then benchmarks/experiments/context_parallel_scale.py (one GPU at 2M tokens,
# two at 4M, each strategy). Run from the repository root on a machine with two CUDA GPUs
# (no install needed):
#   bash scripts/two_gpu_check.sh [TEST_SECONDS] [SCALE_SECONDS]
# Logs go to $OUT (or ./two-gpu-check): tests.log, scale.log, context_parallel_scale.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-two-gpu-check}"
mkdir -p "$OUT"
export OUT PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
BLOCKSPARSE_ATTN_AUTOTUNE=0 timeout "${1:-300}" python3 -m pytest -v -p no:cacheprovider \
    tests/test_context_parallel.py tests/test_distributed.py > "$OUT/tests.log" 2>&1
echo "tests exit: $?"
grep -E "(FAILED|ERROR) tests/|[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -10
timeout "${2:-280}" torchrun --nproc-per-node 2 benchmarks/experiments/context_parallel_scale.py \
    > "$OUT/scale.log" 2>&1
echo "scale exit: $?"
grep "^{" "$OUT/scale.log"
