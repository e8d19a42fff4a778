#!/usr/bin/env bash
# Issue 20's run of record on the device (benchmarks/rotation12.py), after .gpu-stage/part-00 and
# part-01 were copied (../shared/gpu/README.md); as issue_runs.sh's card12 step:
#   start:  unpack, the extra wheels (.gpu-extra: transformers 5.16.0 and soundfile, for OCR and the
#           transcription upload), JIT caches of an earlier machine (.gpu-extra/jit.tar.xz), the ballast
#           leaving 12 GiB, then rotation12.py in the background (setsid: first starts compile, so it
#           outlasts one call), and polls it for the rest of the call.
#           Carry: .gpu-stage/part-02 .gpu-stage/unpack.sh .gpu-stage/MANIFEST .gpu-stage/models
#           .gpu-stage/ballast.py .whl .gpu-extra (or part-02 in a call of its own first: 64 MiB a call).
#   poll:   waits up to 9 minutes for the run, brings back what it wrote so far (the result file, its
#           log, the daemon's and servers' logs); call it back to back until the run has ended.
#   mixed:  then issue 11's one-at-a-time mixed load again on the whole card (ballast gone), to see
#           that the restore step does not cost it: a warm-up, each mix the median of three passes
#           (issue_runs.sh mixed1; mixed_load_<device>.txt).
# ROTATION12_ARGS passes flags (e.g. --explicit-checkpoint where the scheduler does not checkpoint yet).
# Usage: bash benchmarks/device/rotation12.sh start|poll|mixed
source "$(dirname "$0")/kit.sh"

start() {
  kit_setup
  ballast12
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH="/tmp/site0:$PYTHONPATH" setsid python3 benchmarks/rotation12.py \
    --out /tmp/rotation12.txt ${ROTATION12_ARGS:-} > /tmp/rotation12.log 2>&1 < /dev/null &
  echo $! > /tmp/rotation12.pid
  poll "${START_POLL_N:-100}"  # (the setup takes about a minute of the call's 10)
}

running() { kill -0 "$(cat /tmp/rotation12.pid 2>/dev/null)" 2>/dev/null; }

poll() {  # poll [N]: wait up to N x 5 s (108: 9 minutes) for the run to end
  wait_for /tmp/rotation12.pid "${1:-}"
  tag=$(device_tag)
  cp /tmp/rotation12.txt "$out/rotation12_${tag}.txt" 2>/dev/null; tail -c 60000 /tmp/rotation12.log > "$out/rotation12.log"
  (cd /tmp && tar -cJf "$out/logs.tar.xz" mm-card12-*/state/logs 2>/dev/null)  # the daemon's and each server's
  cat /tmp/rotation12.txt 2>/dev/null; tail -n 3 /tmp/rotation12.log
  nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv
  if ! running; then tar -cJf "$out/jit.tar.xz" -C ~/.cache vllm flashinfer 2>/dev/null; fi
}

mixed() {
  running && { echo "rotation12.py still runs: poll first"; return 1; }
  kill "$(grep -o "ballast pid [0-9]*" /tmp/ballast.log | grep -o "[0-9]*$")" 2>/dev/null; sleep 5
  bash benchmarks/device/issue_runs.sh mixed1
  tag=$(device_tag)
  mv "$out/mixed_load.txt" "$out/mixed_load_${tag}.txt"
}

for step in "$@"; do echo "== $step"; $step; done
