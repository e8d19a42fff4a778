#!/usr/bin/env bash
# Issue 23's run of record on the device (benchmarks/batch12.py), after .gpu-stage/part-00 and
# part-01 were copied (../shared/gpu/README.md); as rotation12.sh:
#   start:  unpack, the extra wheels if carried (.gpu-extra/*.whl), JIT caches of an earlier machine
#           (.gpu-extra/jit.tar.xz), the ballast leaving 12 GiB, then batch12.py in the background
#           (setsid: the chat profile's first start compiles, the sweep and the two 1,000-prompt runs
#           take minutes, so it outlasts one call), and polls it for the rest of the call.
#           Carry: .gpu-stage/part-02 .gpu-stage/unpack.sh .gpu-stage/MANIFEST .gpu-stage/models
#           .gpu-stage/ballast.py .whl .gpu-extra (or part-02 in a call of its own first: 64 MiB a call).
#   poll:   waits up to 9 minutes for the run, brings back what it wrote so far (at most 6 of $OUT's 8
#           files: batch_<device>.txt, batch_sweep_<device>.png, batch12.log, logs.tar.xz with the
#           daemon's, the server's and both clients' logs, jit.tar.xz once it has ended); call it back
#           to back until the run has ended.
# BATCH12_ARGS passes flags (e.g. "--prompts 500" where device time is short).
# Usage: bash benchmarks/device/batch12.sh start|poll
source "$(dirname "$0")/kit.sh"

start() {
  kit_setup
  ballast12
  python3 -c "import pandas" 2>/dev/null || echo "(no pandas here: vLLM's bench reads the prompts as its ShareGPT dataset)"
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH="/tmp/site0:$PYTHONPATH" setsid python3 benchmarks/batch12.py \
    --out /tmp/batch12.txt ${BATCH12_ARGS:-} > /tmp/batch12.log 2>&1 < /dev/null &
  echo $! > /tmp/batch12.pid
  poll "${START_POLL_N:-100}"  # (the setup takes about a minute of the call's 10)
}

running() { kill -0 "$(cat /tmp/batch12.pid 2>/dev/null)" 2>/dev/null; }

poll() {  # poll [N]: wait up to N x 5 s (108: 9 minutes) for the run to end
  wait_for /tmp/batch12.pid "${1:-}"
  tag=$(device_tag)
  cp /tmp/batch12.txt "$out/batch_${tag}.txt" 2>/dev/null
  cp /tmp/batch_sweep_*.png "$out/batch_sweep_${tag}.png" 2>/dev/null
  tail -c 60000 /tmp/batch12.log > "$out/batch12.log"
  # the daemon's and the server's logs, and both clients' (vllm bench serve, mm batch)
  (cd /tmp && tar -cJf "$out/logs.tar.xz" mm-card12-*/state/logs mm-batch12-*/*.log 2>/dev/null)
  cat /tmp/batch12.txt 2>/dev/null; tail -n 3 /tmp/batch12.log
  nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv
  if ! running; then tar -cJf "$out/jit.tar.xz" -C ~/.cache vllm flashinfer 2>/dev/null; fi
}

for step in "$@"; do echo "== $step"; $step; done
