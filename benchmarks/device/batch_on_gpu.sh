#!/usr/bin/env bash
# `mm batch` beside `vllm bench serve` on a real GPU (benchmarks/batch_throughput.py): the same 1,000
# prompts, the same server and endpoint, mm batch's own concurrency; the throughput ratio printed.
#
# Where: the device machine, from the repository root, with vLLM unpacked in /tmp/site
# (.gpu-stage/unpack.sh, run here if /tmp/site is not ready: copy the parts to /tmp/stage first) and
# python3. Carry .whl (platformdirs, tomli-w) and .gpu-stage/models.
#
#   bash benchmarks/device/batch_on_gpu.sh
#
# Knobs: PROFILE_FILE (default tests/fixtures/profiles-gpu/perf-dummy.toml: perf's settings on the
# dummy 7B AWQ model, random weights, 0.125 of an 80 GB card), PROMPTS (1000), OUTPUT_LEN (64),
# ROUNDS (2). Writes $OUT/batch_throughput.txt and the server log's tail.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/.gpu-out}"
mkdir -p "$out"
py="${PY:-python3}"
profile_file="${PROFILE_FILE:-tests/fixtures/profiles-gpu/perf-dummy.toml}"
profile="$(basename "$profile_file" .toml)"
export PYTHONPATH="/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

[ -f /tmp/site/.unpacked ] || { mkdir -p /tmp/stage && bash .gpu-stage/unpack.sh; }
if ! $py -c "import platformdirs, tomli_w" 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/platformdirs-*.whl \
    .whl/tomli_w-*.whl
fi
$py -c "import sys, vllm, mmlib.cli; print('python', sys.version.split()[0], '| vllm', vllm.__version__)"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true

scratch="$(mktemp -d /tmp/mm-batch.XXXXXX)"
export MM_HOME="$scratch/home" MM_RESULTS_DIR="$scratch/results"
MM_PROXY_PORT="$($py -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export MM_PROXY_PORT
mkdir -p "$MM_HOME/config/profiles"
cp "$profile_file" "$MM_HOME/config/profiles/"

finish() {
  rc=$?
  tail -n 200 "$MM_HOME/state/logs/$profile.log" > "$out/server.log" 2>/dev/null || true
  [ "$rc" -eq 0 ] || tail -n 40 "$MM_HOME/state/logs/$profile.log" 2>/dev/null || true
  $py -m mmlib daemon stop >/dev/null 2>&1 || true
  echo "done (exit $rc) at $SECONDS s"
}
trap finish EXIT

# --force: the guard rails rightly flag a model folder without weight files (load_format dummy)
$py benchmarks/batch_throughput.py --profile "$profile" --force --prompts "${PROMPTS:-1000}" \
  --output-len "${OUTPUT_LEN:-64}" --rounds "${ROUNDS:-2}" --out "$out/batch_throughput.txt"
