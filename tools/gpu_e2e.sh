#!/bin/bash
# The real-model GPU run in one command (GPU machine, repository root, kernels prebuilt in cuda/build/):
#   source .gpu-kit/setup.sh && bash tools/gpu_e2e.sh /tmp/model.gguf
# 1. real-model correctness: CUDA backend vs the numpy reference of the same arithmetic (teacher-forced
#    top-1, greedy 32 tokens, weight bytes): tensor-core (default), fp32 and fused fp32 forwards;
# 2. the GPU sampler, the linear and attention kernels, and the backend on synthetic real-shape
#    weights (every layout bitwise equal; prefill = decode = batched);
# 3. the worker process on the cuda backend (16 streams == alone, abort, kill -9);
# 4. the service end to end: `qwen-serve serve --backend auto`, `qwen-client info`, the haiku;
# 5. the issue-5 benchmarks (benchmarks/run_all.sh), time-boxed.
# Logs in WORK_DIR (/tmp/gpu_e2e), returned as one tarball in $OUT. SKIP_BENCH=1: parts 1-4 only;
# ONLY_BENCH=1: part 5 only (TOTAL seconds, default 260).
set -u -o pipefail
MODEL="$(realpath "${1:?usage: tools/gpu_e2e.sh MODEL.gguf}")"
# Everything is written under a work dir; one tarball of it goes to $RETURN_DIR (the device tool's $OUT).
RETURN_DIR="${OUT:-}"
OUT="${WORK_DIR:-/tmp/gpu_e2e}"; mkdir -p "$OUT"
pack() { [ -n "$RETURN_DIR" ] && tar -C "$OUT" -czf "$RETURN_DIR/gpu_e2e_$1.tar.gz" --exclude model_cache . ; }
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/clients/python${PYTHONPATH:+:$PYTHONPATH}"
# the real-model tests find the default model through the cache dir
export QWEN_SERVE_CACHE_DIR="$OUT/model_cache"; mkdir -p "$QWEN_SERVE_CACHE_DIR"
ln -sf "$MODEL" "$QWEN_SERVE_CACHE_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
section() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

if [ "${ONLY_BENCH:-0}" != "1" ]; then
section "card and stubs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
$PY -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/qwen_serve/v1/generate.proto \
  && touch qwen_serve/__init__.py qwen_serve/v1/__init__.py
ls -la cuda/build/qwen_kernels.fatbin || { echo "no fatbin: build it with make kernels"; exit 1; }

section "GPU tests (one process per file)"
for f in tests/gpu/test_cuda_real_model.py tests/gpu/test_sampling_kernels.py \
         tests/gpu/test_linear_mma.py tests/gpu/test_attention_kernels.py tests/gpu/test_cuda_backend.py \
         tests/test_worker_cuda.py; do
  timeout -k 5 "$(case $f in *real_model*) echo 300;; *worker*) echo 90;; *) echo 60;; esac)" $PY -m pytest "$f" -m gpu -v -s -p no:cacheprovider -p no:timeout 2>&1 \
    | tee -a "$OUT/gpu_tests.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|prompt [0-9]|weights on|agreement|identical|rel|passed|failed"
done

section "service end to end (qwen-serve serve --backend auto)"
export QWEN_CLIENT_TARGET=127.0.0.1:50151
$PY -m server.cli serve --backend auto --model "$MODEL" --port 50151 --kv-cache-gb 2 > "$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 120); do
  $PY -m qwen_client.cli health >/dev/null 2>&1 && break; sleep 0.5
done
$PY -m qwen_client.cli info | tee "$OUT/model_info.json"
echo "--- qwen-client chat 'Write a haiku about autumn leaves' --temperature 0 --max-tokens 48"
timeout 60 $PY -m qwen_client.cli chat "Write a haiku about autumn leaves" \
  --temperature 0 --max-tokens 48 | tee "$OUT/haiku_gpu.txt"
echo; timeout 60 $PY -m qwen_client.cli chat "Write a haiku about autumn leaves" \
  --temperature 0 --max-tokens 48 --json > "$OUT/haiku_gpu.jsonl"; tail -1 "$OUT/haiku_gpu.jsonl"
kill -TERM $SERVER; wait $SERVER; echo "serve exit code: $?"
grep -iE "backend|cuda|listening" "$OUT/serve.log" | head -5

section "per-kernel time of a decode step on the real model (batch 1, 64, 256)"
for cfg in "1 256" "64 256" "256 128"; do
  set -- $cfg
  timeout 100 $PY tests/gpu/profile_decode_step.py "$MODEL" --batch "$1" --context "$2" 2>&1 | grep "^|" | tee -a "$OUT/profile.log"
done

fi
[ "${SKIP_BENCH:-0}" = "1" ] && { pack tests; exit 0; }
section "benchmarks"
OUT="$OUT/bench" TOTAL="${TOTAL:-260}" SKIP_F16="${SKIP_F16:-1}" bash benchmarks/run_all.sh "$MODEL"
pack all
