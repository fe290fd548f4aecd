#!/usr/bin/env bash
# The GPU check: the whole test suite on the GPU, then the benchmark beside FlexAttention and
# SDPA. Run from the repository root on a CUDA machine (no install needed):
#   bash scripts/gpu_check.sh [TEST_SECONDS] [BENCH_SECONDS] [bench args...]
# Logs go to $OUT (or ./gpu-check) as tests.log, sanitize.log (compute-sanitizer memcheck over
# scripts/sanitize_kernels.py), bench.log, bench.jsonl, bench.md and the plots; with
# DEMO_SECONDS > 0 also demo.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
TEST_SECONDS="${1:-330}"
BENCH_SECONDS="${2:-240}"
shift 2 2>/dev/null || shift $#
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m blocksparse_attn.tools.cli env | tee -a "$OUT/gpu.txt"
# one launch config per kernel in tests: compile time, not speed, matters there
BLOCKSPARSE_ATTN_AUTOTUNE=0 timeout "$TEST_SECONDS" python3 -m pytest tests -v -n 8 \
    -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 > "$OUT/tests.log"
echo "tests exit: $?"
grep -E "(FAILED|ERROR) tests/|^E   " "$OUT/tests.log" | head -40
grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -1
# memory errors in every kernel on odd shapes (SANITIZE=0 skips it)
if [ "${SANITIZE:-1}" != 0 ]; then
    BLOCKSPARSE_ATTN_AUTOTUNE=0 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 scripts/sanitize_kernels.py > "$OUT/sanitize.log" 2>&1
    echo "compute-sanitizer exit: $?"
    grep -E "ERROR SUMMARY|NOT FINITE" "$OUT/sanitize.log" | tail -3
fi
if [ "$BENCH_SECONDS" -gt 0 ]; then
    timeout "$BENCH_SECONDS" python3 -m blocksparse_attn.tools.cli bench --out "$OUT" "$@" \
        2>&1 | tee "$OUT/bench.log" | tail -60
    echo "bench exit: ${PIPESTATUS[0]}"
fi
if [ "${DEMO_SECONDS:-0}" -gt 0 ]; then
    timeout "$DEMO_SECONDS" python3 -m blocksparse_attn.tools.cli demo 2>&1 | tee "$OUT/demo.log" \
        | grep -v "^ *\(sparse\|dense\) [0-9]*/"
    echo "demo exit: ${PIPESTATUS[0]}"
fi
