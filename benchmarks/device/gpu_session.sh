#!/usr/bin/env bash
# What mm verifies on a real GPU, in one device call (after the .gpu-stage parts were copied there;
# see ../shared/gpu/README.md). Carry: .gpu-stage/part-02 .gpu-stage/unpack.sh .gpu-stage/MANIFEST
# .gpu-stage/models .whl
#   1. perf's full settings (FlashInfer, KV offload, fp8 KV, async scheduling) start through mm, in
#      the background (FlashInfer's JIT takes minutes); `perf_check` below looks at it later.
#   2. mm doctor and mm check on the GPU (benchmarks/device/check_on_gpu.sh).
#   3. switch times through mm beside raw vLLM sleep/wake (benchmarks/switch_time.py).
# Usage: bash benchmarks/device/gpu_session.sh [setup|perf_start|check|switch|perf_check]...
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/mm-out}"; mkdir -p "$out"
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
PERF_HOME=/tmp/mm-perf

setup() {
  mkdir -p /tmp/stage && bash .gpu-stage/unpack.sh || exit 1
  python3 -c "import platformdirs, tomli_w" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
}

perf_start() {
  mkdir -p $PERF_HOME/config/profiles && cp tests/fixtures/profiles-gpu/*.toml $PERF_HOME/config/profiles/
  MM_HOME=$PERF_HOME MM_PROXY_PORT=8100 python3 -m mmlib profiles show perf-full | tail -1
  # setsid: the daemon and the start outlive this call while the machine stays warm.
  MM_HOME=$PERF_HOME MM_PROXY_PORT=8100 setsid python3 -m mmlib up perf-full --force \
    > /tmp/perf-up.log 2>&1 < /dev/null &
  echo "perf-full starting in the background"
}

check() { [ -f benchmarks/device/check_on_gpu.sh ] && bash benchmarks/device/check_on_gpu.sh; }

switch() { python3 benchmarks/switch_time.py --models-dir .gpu-stage/models --out "$out/switch.txt"; }

perf_check() {
  export MM_HOME=$PERF_HOME MM_PROXY_PORT=8100
  cat /tmp/perf-up.log
  python3 -m mmlib status
  python3 - <<'PY'
import time, httpx
t0 = time.perf_counter()
r = httpx.post("http://127.0.0.1:8100/v1/chat/completions", timeout=120, json={
    "model": "perf-full", "max_tokens": 32, "ignore_eos": True, "messages": [{"role": "user", "content": "hi"}]})
print("perf-full through mm:", r.status_code, r.json().get("usage"), f"{time.perf_counter() - t0:.2f} s")
PY
  grep -iE "flashinfer|offload|kv cache|fp8|async" "$PERF_HOME/state/logs/perf-full.log" | grep -v Warning | head -20
  tail -n 200 "$PERF_HOME/state/logs/perf-full.log" > "$out/perf-full.log"
  python3 -m mmlib daemon stop
}

perf_full() {  # the same in the foreground: start, answer, sleep, wake through a request, stop
  mkdir -p $PERF_HOME/config/profiles && cp tests/fixtures/profiles-gpu/*.toml $PERF_HOME/config/profiles/
  export MM_HOME=$PERF_HOME MM_PROXY_PORT=8100
  timeout 500 python3 -m mmlib up perf-full --force || { tail -40 $PERF_HOME/state/logs/perf-full.log; return 1; }
  python3 -m mmlib status
  ask() { python3 -c 'import sys, time, httpx
t0 = time.perf_counter()
r = httpx.post("http://127.0.0.1:8100/v1/chat/completions", timeout=120, json={"model": "perf-full",
    "max_tokens": 32, "ignore_eos": True, "messages": [{"role": "user", "content": "hi"}]})
print(sys.argv[1], r.status_code, r.json().get("usage", r.text[:200]), f"{time.perf_counter() - t0:.3f} s")' "$1"; }
  ask "request, awake:"
  python3 -m mmlib sleep perf-full
  python3 -m mmlib status
  ask "request, asleep (mm wakes it first):"
  python3 -m mmlib status
  grep -iE "offload|flashinfer|fp8|async sched|sleep|wake|KV cache" "$PERF_HOME/state/logs/perf-full.log" \
    | grep -viE "warn|deprecat" | cut -c1-220 | head -25
  python3 -m mmlib daemon stop
}

for step in "${@:-setup perf_start check switch}"; do for s in $step; do echo "== $s"; $s; done; done
