#!/usr/bin/env bash
# `mm bench --quick` on a real GPU, checked against vLLM's own `vllm bench serve`.
#
# Where: the H100 device machine, from the repository root, with vLLM unpacked in /tmp/site
# (.gpu-stage/unpack.sh; this script runs it if /tmp/site is not ready) and python3 3.12.
# mm needs two small pure-Python packages the image lacks (platformdirs, tomli-w): their wheels
# sit in .whl/ (ignored by git), so carry ".whl" and ".gpu-stage/models" with the call.
#
#   bash benchmarks/device/bench_on_gpu.sh
#
# Knobs (environment): DIRECT_SCENARIOS (default "c10 heavy"; two at most, or $OUT's 8 files
# overflow), PY (default python3), PROFILE_FILE (default the perf-dummy fixture; e.g.
# tests/fixtures/profiles-gpu/perf-full.toml), MM_BENCH_ARGS (more `mm bench` arguments, e.g.
# "--scenario c10"). Tried here on the CPU build with PY=.venv/bin/python, a CPU profile and
# MM_CACHE_DIR set; not yet on the device.
#
# What it does: a scratch MM_HOME with tests/fixtures/profiles-gpu/perf-dummy.toml as a user
# profile (perf's settings on the dummy 7B AWQ model, random weights); `mm bench perf-dummy --quick`
# (the daemon starts the server); then `vllm bench serve` straight at the same server with the
# parameters mm recorded, and both sets of figures side by side. Into $OUT (8 files at most): mm's
# result JSON, summary.md, the two plots, vLLM's direct result JSONs, run.log and the server log's
# tail. Budget: under 8 minutes, server start (60-190 s) included.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/.gpu-out}"
mkdir -p "$out"
exec > >(tee -a "$out/run.log") 2>&1

py="${PY:-python3}"
profile_file="${PROFILE_FILE:-tests/fixtures/profiles-gpu/perf-dummy.toml}"
profile="$(basename "$profile_file" .toml)"
export PYTHONPATH="/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1   # nothing outside can be reached
direct="${DIRECT_SCENARIOS:-c10 heavy}"

say() { printf '\n== %s (at %d s)\n' "$*" "$SECONDS"; }

say "set-up"
$py -c "import vllm" 2>/dev/null || [ -f /tmp/site/.unpacked ] || { mkdir -p /tmp/stage && bash .gpu-stage/unpack.sh; }
if ! $py -c "import platformdirs, tomli_w" 2>/dev/null; then
  if ! ls .whl/platformdirs-*.whl .whl/tomli_w-*.whl >/dev/null 2>&1; then
    echo "mm needs platformdirs and tomli-w: carry .whl (see this script's header)"; exit 1
  fi
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/platformdirs-*.whl \
    .whl/tomli_w-*.whl
fi
if [ -z "${PROFILE_FILE:-}" ] && [ ! -f .gpu-stage/models/dummy-7b-awq/config.json ]; then
  echo "no .gpu-stage/models/dummy-7b-awq: carry .gpu-stage/models"; exit 1
fi
$py -c "import sys, vllm, mmlib.cli; print('python', sys.version.split()[0], '| vllm', vllm.__version__)"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true

scratch="$(mktemp -d /tmp/mm-gpu.XXXXXX)"
export MM_HOME="$scratch/home" MM_RESULTS_DIR="$scratch/results"
MM_PROXY_PORT="$($py -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export MM_PROXY_PORT
mkdir -p "$MM_HOME/config/profiles"
cp "$profile_file" "$MM_HOME/config/profiles/"

finish() {
  rc=$?
  server_log="$MM_HOME/state/logs/$profile.log"
  tail -n 300 "$server_log" > "$out/server.log" 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then
    echo "FAILED (exit $rc); last lines of the server, bench and daemon logs:"
    tail -n 40 "$server_log" 2>/dev/null || true
    grep -v -e nanobind -e leaked "$MM_HOME/state/logs/bench-$profile.log" 2>/dev/null | tail -n 20 || true
    tail -n 20 "$MM_HOME/state/logs/daemon.log" 2>/dev/null || true
  fi
  $py -m mmlib daemon stop >/dev/null 2>&1 || true
  for _ in $(seq 60); do [ -S "$MM_HOME/state/mm.sock" ] || break; sleep 0.5; done
  say "done (exit $rc)"
}
trap finish EXIT

say "mm bench $profile --quick (the daemon starts the server first)"
# --force: the guard rails would rightly flag a model folder without weight files (load_format dummy).
# shellcheck disable=SC2086
timeout 420 $py -m mmlib bench "$profile" --quick --force ${MM_BENCH_ARGS:-}

result="$(ls "$MM_RESULTS_DIR/$profile"/*-bench.json | tail -n 1)"
read -r url served tokenizer < <($py -c 'import json, sys
from mmlib.measure.bench import tokenizer_path
s = json.load(open(sys.argv[1]))["server"]
print(s["url"], s["served_model_name"], tokenizer_path(s["model"]))' "$result")
cp "$result" "$out/mm-$profile-bench.json"
cp "$MM_RESULTS_DIR/summary.md" "$MM_RESULTS_DIR"/*.png "$out/"

say "GPU memory as nvidia-smi sees it, server still up"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader || true
$py -m mmlib status

for s in $direct; do
  say "vllm bench serve, direct, scenario $s"
  # The parameters mm recorded for this scenario, spelled out as vLLM's flags.
  args=()
  read -r -a args < <($py - "$result" "$s" <<'EOF'
import json, sys
scenarios = json.load(open(sys.argv[1]))["scenarios"]
if sys.argv[2] not in scenarios:
    sys.exit(0)
p = scenarios[sys.argv[2]]["params"]
a = ["--random-input-len", p["input_len"], "--random-output-len", p["output_len"], "--num-prompts", p["prompts"],
     "--request-rate", "inf" if p["request_rate"] is None else p["request_rate"]]
a += ["--max-concurrency", p["max_concurrency"]] if p["max_concurrency"] else []
a += ["--num-warmups", p["warmups"]] if p["warmups"] else []
print(" ".join(map(str, a)))
EOF
  ) || true
  [ "${#args[@]}" -gt 0 ] || { echo "mm's result has no scenario $s: skipped"; continue; }
  timeout 100 $py -m vllm.entrypoints.cli.main bench serve --backend vllm --endpoint /v1/completions \
    --base-url "$url" --model "$served" --tokenizer "$tokenizer" --dataset-name random --ignore-eos \
    --seed 0 "${args[@]}" --save-result --result-dir "$out" --result-filename "direct-$s.json" \
    2>&1 | grep -v -e "nanobind" -e "leaked" || true
done

say "side by side: mm bench vs vllm bench serve (same server, same parameters)"
$py - "$result" "$out" $direct <<'EOF'
import json, sys
from pathlib import Path

doc, out, names = json.load(open(sys.argv[1])), Path(sys.argv[2]), sys.argv[3:]
keys = [("mean TTFT ms", "mean_ttft_ms"), ("P99 TTFT ms", "p99_ttft_ms"), ("mean TPOT ms", "mean_tpot_ms"),
        ("output tok/s", "output_throughput"), ("peak output tok/s", "max_output_tokens_per_s"),
        ("total tok/s", "total_token_throughput"), ("completed", "completed"), ("failed", "failed")]
print(f"GPU {doc['gpu']}, vLLM {doc['vllm']['version']}, mode {doc['mode']}, complete {doc['complete']}")
print(f"{'scenario':10} {'metric':20} {'mm bench':>12} {'vllm direct':>12} {'direct/mm':>10}")
for name, entry in doc["scenarios"].items():
    fig = entry["figures"]
    path = out / f"direct-{name}.json"
    raw = json.loads(path.read_text()) if name in names and path.exists() else {}
    for label, key in keys:
        a, b = fig.get(key), raw.get(key)
        ratio = f"{b / a:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""
        cell = lambda v: "-" if v is None else f"{v:.1f}"
        print(f"{name:10} {label:20} {cell(a):>12} {cell(b):>12} {ratio:>10}")
m = doc["memory"]
print("memory while mm's bench ran (peak / mean, MiB):")
for key, label in (("gpu_server_mib", "server GPU (NVML, its processes)"), ("gpu_device_mib", "whole GPU"),
                   ("rss_mib", "server RAM (RSS of its tree)"), ("ram_used_mib", "system RAM in use")):
    print(f"  {label:34} {m['peak'][key]} / {m['mean'][key]}")
print(f"  samples {m['samples']} at {1 / m['interval_s']:.0f} Hz; GPU total {m['gpu_total_mib']} MiB")
EOF
ls -la "$out"
