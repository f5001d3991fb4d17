#!/bin/bash
# The whole issue-5 benchmark in one command (GPU machine, repository root):
#   bash benchmarks/run_all.sh MODEL.gguf
# Runs, each under `timeout` (a part that hangs or overruns loses only itself; its JSON keeps
# what was measured before): engine bench on MODEL, gRPC load against a server it starts, the HF
# transformers baseline, the engine bench on MODEL's F16 conversion; then benchmarks/report.py
# merges the JSONs into $RESULTS/gpu_<card>_<date>.{json,md} (copied to $OUT/results too) and
# prints the table last. A total deadline (TOTAL) shrinks the later parts so the report always runs.
#
# Environment (all optional):
#   PY=python3  BACKEND=cuda  OUT=/tmp/qwen_bench (logs + raw JSON)  RESULTS=benchmarks/results
#   TOTAL=345                                             seconds for everything, report included
#   SKIP_ENGINE=1 SKIP_GRPC=1 SKIP_HF=1 SKIP_F16=1      skip a part
#   T_ENGINE=60 T_GRPC=55 T_HF=150 T_F16=55              per-part timeouts (F16: conversion + bench)
#   F16_MODEL=/tmp/<model>.<bytes>.f16.gguf               reused when present, else converted (1.3 GB)
#   ENGINE_ARGS= GRPC_ARGS= HF_ARGS= F16_ARGS=            extra flags, e.g. ENGINE_ARGS="--batches 1,64"
#   QUICK=1                                               tiny sizes everywhere (checks the harness)
#   GRPC_WAVES=5                                          runs of each gRPC level (median reported; 1 with QUICK)
#   HF_DEVICE=cuda                                        device for the HF baseline
set -u -o pipefail
MODEL="${1:?usage: bash benchmarks/run_all.sh MODEL.gguf}"
MODEL="$(realpath "$MODEL")"
cd "$(dirname "$0")/.."
DEADLINE=$(( $(date +%s) + ${TOTAL:-345} ))
REPORT_RESERVE=10
PY="${PY:-python3}"
BACKEND="${BACKEND:-cuda}"
OUT="${OUT:-/tmp/qwen_bench}"
RESULTS="${RESULTS:-benchmarks/results}"
# Named after the source's name and size, so a conversion of another model is never reused.
F16_MODEL="${F16_MODEL:-/tmp/$(basename "$MODEL" .gguf).$(stat -c %s "$MODEL").f16.gguf}"
QUICK_FLAG=""; [ "${QUICK:-0}" = "1" ] && QUICK_FLAG="--quick"
GRPC_WAVES="${GRPC_WAVES:-5}"; [ "${QUICK:-0}" = "1" ] && GRPC_WAVES=1
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
rm -f "$OUT"/engine.json "$OUT"/engine_f16.json "$OUT"/grpc.json "$OUT"/hf.json

# Prerequisites a fresh checkout may lack: the Python gRPC stubs, the kernel fatbin.
if [ ! -f qwen_serve/v1/generate_pb2_grpc.py ]; then
  "$PY" -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. \
    proto/qwen_serve/v1/generate.proto && touch qwen_serve/__init__.py qwen_serve/v1/__init__.py
fi
if [ "$BACKEND" = "cuda" ] && [ ! -f cuda/build/qwen_kernels.fatbin ]; then make kernels; fi

# seconds left before the report's reserve
left() { echo $(( DEADLINE - REPORT_RESERVE - $(date +%s) )); }

# part NAME SECONDS CMD...: run CMD under timeout (cut to the total deadline), log to
# $OUT/NAME.log; never stops the script.
part() {
  local name="$1" limit="$2"; shift 2
  local remaining; remaining=$(left)
  [ "$remaining" -lt "$limit" ] && limit=$remaining
  if [ "$limit" -lt 5 ]; then echo "!!! $name skipped: the total deadline (TOTAL) is reached"; return 0; fi
  echo; echo "=== $name (timeout ${limit} s, $(date -u +%H:%M:%S))"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "!!! $name timed out after ${limit} s (partial results kept)"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && echo "!!! $name exited with $rc"
  return 0
}

# shellcheck disable=SC2086  # QUICK_FLAG and the *_ARGS variables are flag lists, split on purpose
{
if [ "${SKIP_ENGINE:-0}" != "1" ]; then
  part engine "${T_ENGINE:-60}" "$PY" -m benchmarks.engine_bench "$MODEL" --backend "$BACKEND" --label default \
    --budget-s 25 --json "$OUT/engine.json" $QUICK_FLAG ${ENGINE_ARGS:-}
fi
if [ "${SKIP_GRPC:-0}" != "1" ]; then
  part grpc "${T_GRPC:-55}" "$PY" -m benchmarks.grpc_load --serve-model "$MODEL" --backend "$BACKEND" \
    --budget-s 15 --waves "$GRPC_WAVES" --json "$OUT/grpc.json" $QUICK_FLAG ${GRPC_ARGS:-}
fi
if [ "${SKIP_HF:-0}" != "1" ]; then
  part hf "${T_HF:-150}" "$PY" -m benchmarks.hf_baseline "$MODEL" --device "${HF_DEVICE:-cuda}" \
    --budget-s 45 --json "$OUT/hf.json" $QUICK_FLAG ${HF_ARGS:-}
fi
if [ "${SKIP_F16:-0}" != "1" ]; then
  f16_deadline=$(( $(date +%s) + ${T_F16:-55} ))
  if [ ! -s "$F16_MODEL" ]; then
    part convert_f16 "${T_F16:-55}" "$PY" -m server.cli convert --to f16 "$MODEL" "$F16_MODEL"
  fi
  f16_left=$(( f16_deadline - $(date +%s) ))
  if [ -s "$F16_MODEL" ] && [ "$f16_left" -gt 10 ]; then
    part engine_f16 "$f16_left" "$PY" -m benchmarks.engine_bench "$F16_MODEL" --backend "$BACKEND" \
      --label f16 --budget-s 12 --skip aggregate --json "$OUT/engine_f16.json" $QUICK_FLAG ${F16_ARGS:-}
  else
    echo "!!! engine_f16 skipped: no F16 model or under 10 s left"
  fi
fi
}

echo; echo "=== report ($(date -u +%H:%M:%S))"
args=()
for pair in engine:engine.json engine-f16:engine_f16.json grpc:grpc.json hf:hf.json; do
  [ -s "$OUT/${pair#*:}" ] && args+=("--${pair%%:*}" "$OUT/${pair#*:}")
done
"$PY" -m benchmarks.report "${args[@]}" --out-dir "$RESULTS" --also-to "$OUT/results"
