#!/usr/bin/env bash
# Issue 23's data parallel against tensor parallel (benchmarks/dp_vs_tp.py) on a device machine of two
# GPUs or more (nvidia-h100-x2 / nvidia-h200-x2; ask `status` whether one is lent), after
# .gpu-stage/part-00 and part-01 were copied (../shared/gpu/README.md), in two kinds of call:
#   start:  unpack the kit, mm's two wheels (.whl), then dp_vs_tp.py in the background (setsid: two
#           first starts with torch.compile can outlast one call) and poll it for the rest of the call.
#           Carry: .gpu-stage/part-02 .gpu-stage/unpack.sh .gpu-stage/MANIFEST .gpu-stage/models .whl
#   poll:   waits up to 9 minutes for the run, brings back what it wrote so far (the result file, its
#           log, the daemon's and servers' logs); call it back to back until the run has ended.
# DP_VS_TP_ARGS passes flags (e.g. "--model .gpu-stage/models/dummy-1.5b --concurrency 1,32,128").
# The result goes to benchmark_results/dp_vs_tp_<device>.txt, named by the card its header names.
# NVLink multicast stays off (the device's rule: NCCL_NVLS_ENABLE=0 and the others, exported here
# too, and every server mm starts inherits them).
# Usage: bash benchmarks/device/dp_vs_tp.sh start|poll
source "$(dirname "$0")/kit.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

start() {
  nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
  kit_setup
  # shellcheck disable=SC2086
  setsid python3 benchmarks/dp_vs_tp.py --out /tmp/dp_vs_tp.txt ${DP_VS_TP_ARGS:-} > /tmp/dp_vs_tp.log 2>&1 < /dev/null &
  echo $! > /tmp/dp_vs_tp.pid
  poll 100  # (the set-up takes about a minute of the call's 10)
}

running() { kill -0 "$(cat /tmp/dp_vs_tp.pid 2>/dev/null)" 2>/dev/null; }

poll() {  # poll [N]: wait up to N x 5 s (108: 9 minutes) for the run to end
  wait_for /tmp/dp_vs_tp.pid "${1:-}"
  tag=$(device_tag)
  cp /tmp/dp_vs_tp.txt "$out/dp_vs_tp_${tag}.txt" 2>/dev/null; tail -c 60000 /tmp/dp_vs_tp.log > "$out/dp_vs_tp.log"
  (cd /tmp && tar -cJf "$out/logs.tar.xz" mm-dp-vs-tp-*/state/logs 2>/dev/null)  # the daemon's and each server's
  cat /tmp/dp_vs_tp.txt 2>/dev/null; tail -n 5 /tmp/dp_vs_tp.log
  nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv
  running && echo "still running: call poll again" || echo "finished"
}

for step in "$@"; do echo "== $step"; $step; done
