#!/bin/bash
# The whole GPU check in one command, on the GPU machine, from the repository root:
#   source .gpu-kit/setup.sh && bash tools/gpu_suite.sh [MODEL=/tmp/model.gguf]
# Builds the kernels, writes a synthetic model of the real shapes and tensor types, runs every GPU
# test (plus the real-model tests when MODEL is given or the default model is cached), runs a short
# benchmark and prints a summary table last. Logs go to $OUT (or /tmp/gpu_suite).
set -u -o pipefail
for arg in "$@"; do case "$arg" in MODEL=*) MODEL="${arg#MODEL=}" ;; esac; done
MODEL="${MODEL:-}"
OUT="${OUT:-/tmp/gpu_suite}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
declare -A RESULT

step "card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
CARD="$(head -1 "$OUT/card.txt")"

step "build kernels"
start=$(date +%s)
if make kernels 2>&1 | tee "$OUT/build.log"; then RESULT[build]="ok ($(( $(date +%s) - start )) s)"
else RESULT[build]="FAILED"; fi

if [ -n "$MODEL" ]; then   # the real-model tests find the model through the cache dir
  export QWEN_SERVE_CACHE_DIR="$OUT/model_cache"
  mkdir -p "$QWEN_SERVE_CACHE_DIR"
  ln -sf "$(realpath "$MODEL")" "$QWEN_SERVE_CACHE_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
fi

step "GPU tests (one process per file: a CUDA fault in one cannot poison the others)"
: > "$OUT/gpu_tests.log"
passed=0; failed=0; files_failed=""
for f in tests/gpu/test_*.py; do
  $PY -m pytest "$f" -m gpu -v -s -p no:cacheprovider 2>&1 | tee -a "$OUT/gpu_tests.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then failed=$((failed + 1)); files_failed="$files_failed $(basename "$f")"; else passed=$((passed + 1)); fi
done
RESULT[tests]="$(grep -E '^=+ .* in [0-9.]+s' "$OUT/gpu_tests.log" | tr -d '=' | awk '
  { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^(passed|failed|skipped|error|errors|deselected),?$/) { k = $(i + 1); sub(",", "", k); n[k] += $i } }
  END { printf "%d passed, %d failed, %d errors, %d skipped", n["passed"], n["failed"], n["error"] + n["errors"], n["skipped"] }'); files failing:${files_failed:- none}"

step "benchmark (synthetic model, real shapes, Q4_K weights)"
BENCH_MODEL="${MODEL:-$OUT/synthetic_q4k.gguf}"
if [ -z "$MODEL" ]; then
  $PY -m gpu_worker.model.synthetic "$BENCH_MODEL" --preset real --type Q4_K 2>&1 | tail -1
fi
$PY tests/gpu/bench_cuda_backend.py "$BENCH_MODEL" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
$PY tests/gpu/bench_cuda_backend.py "$BENCH_MODEL" --fused --json "$OUT/bench_fused.json" 2>&1 | tee -a "$OUT/bench.log"
step "per-kernel profile of a decode step (batch 1 and 64, context 256)"
for b in 1 64; do
  $PY tests/gpu/profile_decode_step.py "$BENCH_MODEL" --batch $b --context 256 2>&1 | tee -a "$OUT/profile.log"
done
rm -f "$OUT/synthetic_q4k.gguf"

step "summary"
echo "| item | result |"
echo "|---|---|"
echo "| card | $CARD |"
echo "| commit | ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)} |"
echo "| model | ${MODEL:-synthetic (real shapes)} |"
echo "| kernels build | ${RESULT[build]} |"
echo "| GPU tests | ${RESULT[tests]} |"
grep -E '^(FAILED|ERROR) ' "$OUT/gpu_tests.log" | head -20 | sed 's/^/| failure | /; s/$/ |/'
grep -E '^(logits rel error|batch invariance|prompt [0-9]|weights on the GPU)' "$OUT/gpu_tests.log" | sed 's/^/| note | /; s/$/ |/'
grep -E '^\| (card|load|weight bytes|decode|prefill)' "$OUT/bench.log"
grep -E '^\| ' "$OUT/profile.log" 2>/dev/null | grep -vE '^\|---' | head -40
