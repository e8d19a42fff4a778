#!/usr/bin/env bash
# mm's CUDA checkpoint wrapper on a real sleeping vLLM (benchmarks/checkpoint_cycle.py) on an emulated
# 12 GiB card, 7B-AWQ shapes with perf's attention settings (FlashInfer, fp8 KV): its JIT caches come
# back as jit.tar.xz for the next machine. After part-00 and part-01 were copied (shared/gpu/README.md);
# carry .gpu-stage/part-02 .gpu-stage/unpack.sh .gpu-stage/MANIFEST .gpu-stage/models .gpu-stage/ballast.py .whl
# Usage: bash benchmarks/device/checkpoint_run.sh start|poll
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/mm-out}"; mkdir -p "$out"
unset PYTHONDONTWRITEBYTECODE
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
start() {
  mkdir -p /tmp/stage && bash .gpu-stage/unpack.sh > /dev/null || exit 1
  python3 -c "import platformdirs, tomli_w" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  setsid python3 .gpu-stage/ballast.py --leave 12 > /tmp/ballast.log 2>&1 < /dev/null &
  for _ in $(seq 60); do grep -q holding /tmp/ballast.log && break; sleep 1; done; cat /tmp/ballast.log
  setsid python3 benchmarks/checkpoint_cycle.py --model .gpu-stage/models/dummy-7b-awq --out /tmp/checkpoint_cycle.txt \
    --dtype bfloat16 --kv-cache-dtype fp8 --attention-backend FLASHINFER --max-model-len 8192 --max-num-seqs 16 \
    --max-cudagraph-capture-size 16 --kv-cache-memory-bytes 3000000000 --gpu-memory-utilization 0.13 \
    > /tmp/cycle.log 2>&1 < /dev/null &
  echo $! > /tmp/cycle.pid
  poll 100
}
poll() {
  for _ in $(seq "${1:-110}"); do kill -0 "$(cat /tmp/cycle.pid)" 2>/dev/null || break; sleep 5; done
  cp /tmp/checkpoint_cycle.txt "$out/" 2>/dev/null; tail -c 20000 /tmp/cycle.log > "$out/cycle.log"
  tail -c 30000 /tmp/checkpoint_cycle.vllm.log > "$out/vllm.log" 2>/dev/null
  cat /tmp/checkpoint_cycle.txt 2>/dev/null; tail -n 5 /tmp/cycle.log
  if ! kill -0 "$(cat /tmp/cycle.pid)" 2>/dev/null; then
    tar -cJf "$out/jit.tar.xz" -C ~/.cache vllm flashinfer 2>/dev/null; ls -la "$out"
  fi
}
for step in "$@"; do echo "== $step"; $step; done
