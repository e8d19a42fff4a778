# Sourced by the device scripts (rotation12.sh, batch12.sh, dp_vs_tp.sh): the environment vLLM and mm
# run under on the device, the kit's set-up (../shared/gpu/README.md) and the 12 GiB card.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out="${OUT:-/tmp/mm-out}"; mkdir -p "$out"
unset PYTHONDONTWRITEBYTECODE  # (issue_runs.sh: let vLLM's first import write its bytecode)
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
  VLLM_USE_FLASHINFER_SAMPLER=0

kit_setup() {  # unpack, mm's wheels (.whl), the extra wheels (.gpu-extra: into /tmp/site0) and JIT caches
  mkdir -p /tmp/stage && bash .gpu-stage/unpack.sh > /dev/null || exit 1
  for whl in .gpu-extra/*.whl; do [ -f "$whl" ] && python3 -m zipfile -e "$whl" /tmp/site0; done
  python3 -c "import platformdirs, tomli_w" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  [ -f .gpu-extra/jit.tar.xz ] && mkdir -p ~/.cache && tar -xJf .gpu-extra/jit.tar.xz -C ~/.cache
  return 0
}

ballast12() {  # hold all but 12 GiB of the first card (once per machine)
  if ! grep -q holding /tmp/ballast.log 2>/dev/null; then
    CUDA_VISIBLE_DEVICES=0 setsid python3 .gpu-stage/ballast.py --leave 12 > /tmp/ballast.log 2>&1 < /dev/null &
    for _ in $(seq 60); do grep -q holding /tmp/ballast.log && break; sleep 1; done
  fi
  cat /tmp/ballast.log
}

device_tag() {  # h100 or h200, from the first card's name (rotation12.device_tag)
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import rotation12, pynvml; pynvml.nvmlInit(); \
print(rotation12.device_tag(str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))))" 2>/dev/null || echo h100
}

alive() { kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }  # alive PIDFILE

wait_for() {  # wait_for PIDFILE [N]: up to N x 5 s (default POLL_N, else 108: 9 minutes) for the run to end
  for _ in $(seq "${2:-${POLL_N:-108}}"); do alive "$1" || break; sleep 5; done
}
