#!/usr/bin/env bash
# The GPU runs of issues 9 and 11 in two device calls (after .gpu-stage/part-00 and part-01 were
# copied; see ../shared/gpu/README.md). Carry: .gpu-stage/part-02 .gpu-stage/unpack.sh
# .gpu-stage/MANIFEST .gpu-stage/models .gpu-stage/ballast.py .whl
#   first:  setup, then sleep level 2 (benchmarks/level2_wake.py) beside mixed traffic with one model
#           awake at a time on the whole card, each at 0.62 of a 16 GiB budget (benchmarks/mixed_load.py)
#   second: the same mixed traffic on an emulated 12 GiB card, both models sized in bytes so that
#           they fit awake together
#   card12: (issue 10) every shipped profile on the emulated 12 GiB card (benchmarks/card12.py), in
#           the background: it outlasts one call (first starts compile). Carry .gpu-extra (the
#           transformers 5.16.0 and soundfile wheels, tests/fixtures/models-gpu/README.md) with it.
#           On two GPUs (nvidia-h100-x2) the round runs on the second beside the profiles, and once
#           the profiles are done, the first card (ballast gone) runs issue 11's one-at-a-time mixed
#           traffic and switch timing (benchmarks/mixed_load.py --switch, as `first` does), then again
#           with switch_max_wait 0.5 (mixed_load_wait05.txt).
#           Its calls: part-00, part-01, then part-02 with unpack.sh, MANIFEST, ballast.py, .whl and
#           models (`bash .gpu-stage/unpack.sh`), then this step carrying .gpu-extra, models, unpack.sh,
#           MANIFEST, ballast.py and .whl (part-02 and .gpu-extra together pass the 64 MiB a call carries).
#   poll:   polls the background runs for up to 9 minutes and brings back what they wrote so far;
#           call it back to back until they have ended (then it brings back the JIT caches too).
#   mixed:  issue 11's one-at-a-time mixed traffic, switch timing and pause check alone (after the kit's
#           unpack), then the same with switch_pause_in_flight = false (mixed_load_nopause.txt)
# What comes back is named by what ran, not where: a run of record goes to benchmark_results/ named
# by the card its header names (an nvidia-h100 call may come as an H200).
# Usage: bash benchmarks/device/issue_runs.sh first|second|card12|poll|mixed|mixed1
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/mm-out}"; mkdir -p "$out"
# vLLM's processes import from /tmp/site, which the kit ships without bytecode: let the first import
# write it (under PYTHONDONTWRITEBYTECODE every start compiled vLLM's, torch's and transformers'
# sources again, about 28 s in each of a server's two processes on the last run)
unset PYTHONDONTWRITEBYTECODE
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  VLLM_USE_FLASHINFER_SAMPLER=0
header() {
  echo "# $(nvidia-smi -i 0 --query-gpu=name,driver_version --format=csv,noheader), vLLM $(python3 -c 'import vllm; print(vllm.__version__)' 2>/dev/null), $(date -u +%F)"
}

one_at_a_time() {  # one_at_a_time FILE [mixed_load.py flags...]: issue 11's mixed traffic with one model awake at a time, and the switch
  # gpu_budget 16GiB, each model 0.62 of it (vLLM's budget 9.9 GiB, as 0.125 of an H100 once was):
  # one awake (about 12 GiB measured) and one asleep fit, two awake do not. (12GiB left no room for
  # the sleeper's residue either: every switch became a restart.)
  header > "$1"
  echo "# one model awake at a time: both at 0.62 of gpu_budget 16GiB (vLLM budget 9.9 GiB each): one awake + one asleep fit, two awake do not" >> "$1"
  local f="$1"; shift
  timeout "${MIXED_TIMEOUT:-540}" python3 benchmarks/mixed_load.py --models-dir .gpu-stage/models --duration "${MIXED_S:-25}" \
    --switch --budget 16GiB --big-extra "gpu_memory_utilization = 0.62" --small-extra "gpu_memory_utilization = 0.62" \
    "$@" --label one-at-a-time --out "$f"
}

first() {
  mkdir -p /tmp/stage && bash .gpu-stage/unpack.sh || exit 1
  python3 -c "import platformdirs, tomli_w" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  header > "$out/level2_wake.txt"
  # sleep level 2: the script sizes its KV cache in bytes, so starting beside the mixed servers
  # cannot skew vLLM's memory profiling (that race failed the first try: "Error in memory profiling")
  timeout 420 python3 benchmarks/level2_wake.py --tokenizer .gpu-stage/models/dummy-1.5b \
    --out "$out/level2_wake.txt" > "$out/level2.log" 2>&1 &
  one_at_a_time "$out/mixed_load.txt" > "$out/mixed1.log" 2>&1
  wait
  tail -n 5 "$out/level2.log" "$out/mixed1.log"
  cat "$out/level2_wake.txt" "$out/mixed_load.txt"
  tar -cJf "$out/jit.tar.xz" -C ~/.cache vllm flashinfer 2>/dev/null; ls -la "$out"
}

mixed() {  # issue 11 alone: the one-at-a-time mixed traffic, the switch and the pause, then without pausing
  mkdir -p /tmp/stage && bash .gpu-stage/unpack.sh > /dev/null || exit 1
  python3 -c "import platformdirs, tomli_w" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export MIXED_S=15 MIXED_TIMEOUT=290  # both in one call
  one_at_a_time "$out/mixed_load.txt" > "$out/mixed1.log" 2>&1
  one_at_a_time "$out/mixed_load_nopause.txt" --no-pause > "$out/mixed3.log" 2>&1
  tail -n 8 "$out/mixed1.log" "$out/mixed3.log"; cat "$out/mixed_load.txt" "$out/mixed_load_nopause.txt"
}

mixed1() {  # issue 20's re-run of issue 11: the one-at-a-time mixed traffic after a warm-up, each mix the median
  # of three passes (mixed_load.py's defaults), with the switch and the pause; one call
  export MIXED_S="${MIXED_S:-10}" MIXED_TIMEOUT="${MIXED_TIMEOUT:-540}"
  one_at_a_time "$out/mixed_load.txt" > "$out/mixed1.log" 2>&1
  tail -n 8 "$out/mixed1.log"; cat "$out/mixed_load.txt"
}

second() {
  setsid python3 .gpu-stage/ballast.py --leave 12 > /tmp/ballast.log 2>&1 < /dev/null &
  for _ in $(seq 60); do grep -q holding /tmp/ballast.log && break; sleep 1; done; cat /tmp/ballast.log
  f="$out/mixed_load_card12.txt"
  echo "# $(nvidia-smi --query-gpu=name --format=csv,noheader), vLLM 0.26.0, $(date -u +%F); ballast leaves 12.00 GiB free (an emulated 12 GiB card)" > "$f"
  echo "# both models sized in bytes (KV 1.0e9 and 0.6e9 bytes, enforce-eager), gpu_budget 12GiB: they fit awake together" >> "$f"
  timeout 500 python3 benchmarks/mixed_load.py --models-dir .gpu-stage/models --duration 25 --budget 12GiB \
    --big-extra $'gpu_memory_utilization = 0.06\nkv_cache_memory_bytes = 1000000000' \
    --small-extra $'gpu_memory_utilization = 0.05\nkv_cache_memory_bytes = 600000000' \
    --label "12GiB card, together" --out "$f" > "$out/mixed2.log" 2>&1
  tail -n 4 "$out/mixed2.log"; cat "$f"; nvidia-smi --query-gpu=memory.used,memory.total --format=csv
}

ballast() {  # ballast GPU LOG: hold all but 12 GiB of that GPU
  grep -q holding "$2" 2>/dev/null && return
  CUDA_VISIBLE_DEVICES=$1 setsid python3 .gpu-stage/ballast.py --leave 12 > "$2" 2>&1 < /dev/null &
  for _ in $(seq 60); do grep -q holding "$2" && break; sleep 1; done; cat "$2"
}

card12() {
  mkdir -p /tmp/stage && bash .gpu-stage/unpack.sh > /dev/null || exit 1
  for whl in .gpu-extra/*.whl; do [ -f "$whl" ] && python3 -m zipfile -e "$whl" /tmp/site0; done
  python3 -c "import platformdirs, tomli_w" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  # JIT caches of an earlier machine (a jit.tar.xz this script brought back, saved into .gpu-extra/)
  [ -f .gpu-extra/jit.tar.xz ] && mkdir -p ~/.cache && tar -xJf .gpu-extra/jit.tar.xz -C ~/.cache
  ballast 0 /tmp/ballast.log
  gpus=$(nvidia-smi -L | wc -l)
  beside=()
  if [ "$gpus" -ge 2 ] && [ -z "${CARD12_PART:-}" ]; then
    ballast 1 /tmp/ballast1.log
    beside=(--round-gpu 1)
  fi
  # transformers 5.16.0 first: vLLM 0.26's LightOnOCR needs it; soundfile reads the WAV upload
  # CARD12_PART=profiles|round splits the run over two sessions (the file comes back each time: carry
  # it in as .gpu-extra/card12.txt to append the round to it)
  [ -f .gpu-extra/card12.txt ] && cp .gpu-extra/card12.txt /tmp/card12.txt
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH="/tmp/site0:$PYTHONPATH" setsid python3 benchmarks/card12.py \
    --out /tmp/card12.txt --part "${CARD12_PART:-all}" "${beside[@]}" > /tmp/card12.log 2>&1 < /dev/null &
  echo $! > /tmp/runs.pids
  if [ ${#beside[@]} -gt 0 ]; then  # then issue 11 on the first card, once the profiles are done with it
    export -f header one_at_a_time
    setsid bash -c '
      until grep -q "profiles done" /tmp/card12.log; do kill -0 "$(head -1 /tmp/runs.pids)" || exit; sleep 5; done
      kill "$(grep -o "ballast pid [0-9]*" /tmp/ballast.log | grep -o "[0-9]*$")"; sleep 5
      CUDA_VISIBLE_DEVICES=0 one_at_a_time /tmp/mixed_load.txt
      # the lever on the rare model'"'"'s p99: a shorter hold before a switch (config.toml switch_max_wait)
      CUDA_VISIBLE_DEVICES=0 one_at_a_time /tmp/mixed_load_wait05.txt --max-wait 0.5
    ' > /tmp/mixed1.log 2>&1 < /dev/null &
    echo $! >> /tmp/runs.pids
  fi
  poll 90  # (this call's setup took about a minute of its 10)
}

running() {  # any of the background runs still going
  for pid in $(cat /tmp/runs.pids 2>/dev/null); do kill -0 "$pid" 2>/dev/null && return 0; done; return 1
}

poll() {  # poll [N]: wait up to N x 5 s (108: 9 minutes) for the runs to end
  for _ in $(seq "${1:-108}"); do running || break; sleep 5; done
  cp /tmp/card12.txt /tmp/mixed_load.txt /tmp/mixed_load_wait05.txt "$out/" 2>/dev/null; tail -c 60000 /tmp/card12.log > "$out/card12.log"
  tail -c 20000 /tmp/mixed1.log > "$out/mixed1.log" 2>/dev/null
  (cd /tmp && tar -cJf "$out/logs.tar.xz" mm-card12-*/state/logs 2>/dev/null)  # vLLM's own sizes, per server
  cat /tmp/card12.txt /tmp/mixed_load.txt /tmp/mixed_load_wait05.txt 2>/dev/null; tail -n 3 /tmp/card12.log /tmp/mixed1.log 2>/dev/null
  nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv
  # the JIT caches, once all is done (the per-profile compile caches only where they are small)
  if ! running; then
    du -sh ~/.cache/card12-compile 2>/dev/null
    compiled=$(du -sm ~/.cache/card12-compile 2>/dev/null | cut -f1)
    tar -cJf "$out/jit.tar.xz" -C ~/.cache vllm flashinfer $([ "${compiled:-999}" -lt 200 ] && echo card12-compile) 2>/dev/null
  fi
}

for step in "$@"; do echo "== $step"; $step; done
