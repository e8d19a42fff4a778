#!/usr/bin/env bash
# `mm doctor` and `mm check` on a real GPU, against vLLM 0.26's real argument parser.
#
# Where: the H100 device machine, from the repository root, with vLLM unpacked in /tmp/site
# (.gpu-stage/unpack.sh; run here if /tmp/site is not ready) and python3 3.12. Carry
# ".gpu-stage/models" (the dummy models' config.json) and, if you have it, ".whl" (platformdirs and
# tomli-w wheels; without them this script writes two tiny stand-ins for them in its scratch dir).
#
#   bash benchmarks/device/check_on_gpu.sh          # everything into $OUT/check.txt; under 60 s
#
# What it does, in a scratch MM_HOME whose user profiles are tests/fixtures/profiles-gpu/*.toml:
#   1. mm doctor (expects the H100, compute 9.0, no fail line)
#   2. mm check for each fixture (the first check asks vLLM 0.26's parser once, ~15 s), then:
#      check-1.5b and check-7b-awq fit, within 10% of the KV cache vLLM 0.26 printed for them;
#      check-7b-awq-fp16 is refused (fp16 AWQ + fp8 KV on Hopper); check-typo gives one line a problem;
#      check-perf-12gb (perf's settings, dummy 7B AWQ) fits a 12 GiB card (--gpu-memory 12GiB)
#   3. the shipped perf profile: `mm profiles show perf`'s argv through vLLM 0.26's parser, and
#      `mm check perf` without argument errors
# and prints PASS/FAIL for each expectation. Exit status: the number of FAILs.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/.gpu-out}"
mkdir -p "$out"
exec > >(tee "$out/check.txt") 2>&1
py="${PY:-python3}"
export PYTHONPATH="/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

say() { printf '\n== %s (at %d s)\n' "$*" "$SECONDS"; }
fails=0
expect() {  # expect "what" command...: PASS when the command succeeds
  local what="$1"; shift
  if "$@"; then echo "PASS  $what"; else echo "FAIL  $what"; fails=$((fails + 1)); fi
}

say "set-up"
[ -f /tmp/site/.unpacked ] || { mkdir -p /tmp/stage && bash .gpu-stage/unpack.sh; } || exit 99
[ -f .gpu-stage/models/dummy-7b-awq/config.json ] || { echo "no .gpu-stage/models: carry it"; exit 99; }
scratch="$(mktemp -d /tmp/mm-check.XXXXXX)"
if ! $py -c "import platformdirs, tomli_w" 2>/dev/null; then
  if ls .whl/platformdirs-*.whl .whl/tomli_w-*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/platformdirs-*.whl \
      .whl/tomli_w-*.whl
  else  # stand-ins: MM_HOME is set, so platformdirs is never asked; tomli_w only prints `profiles show`
    mkdir -p "$scratch/shim"
    cat > "$scratch/shim/platformdirs.py" <<'PY'
import os
def _d(base, app): return os.path.join(os.path.expanduser(base), app or "")
def user_config_dir(app=None, *a, **k): return _d("~/.config", app)
def user_state_dir(app=None, *a, **k): return _d("~/.local/state", app)
def user_cache_dir(app=None, *a, **k): return _d("~/.cache", app)
PY
    cat > "$scratch/shim/tomli_w.py" <<'PY'
import json
def _v(v):
    if isinstance(v, bool): return "true" if v else "false"
    if isinstance(v, dict): return "{ " + ", ".join(f"{k} = {_v(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list): return "[" + ", ".join(_v(x) for x in v) + "]"
    return json.dumps(v)
def dumps(doc):
    top = [f"{k} = {_v(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{a} = {_v(b)}" for a, b in v.items()) for k, v in doc.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"
PY
    export PYTHONPATH="$PYTHONPATH:$scratch/shim"
  fi
fi
export MM_HOME="$scratch/home"
mkdir -p "$MM_HOME/config/profiles"
cp tests/fixtures/profiles-gpu/*.toml "$MM_HOME/config/profiles/"
$py -c "import sys, vllm; print('python', sys.version.split()[0], '| vllm', vllm.__version__)" 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true

say "mm doctor"
$py -m mmlib doctor; rc=$?
expect "mm doctor exits 0 (no fail line)" test "$rc" -eq 0
$py -m mmlib doctor --json > "$scratch/doctor.json"
expect "mm doctor sees a compute 9.0 GPU" grep -q "compute 9.0" "$scratch/doctor.json"

say "mm check (each fixture; the first one reads vLLM 0.26's parser)"
for p in check-1.5b check-7b-awq check-7b-awq-fp16 check-typo; do
  echo "-- mm check $p"
  $py -m mmlib check "$p"; echo "(exit $?)"
  $py -m mmlib check "$p" --json > "$scratch/$p.json" 2>/dev/null
done
echo "-- mm check check-perf-12gb --gpu-memory 12GiB (perf's settings, a 12 GB card)"
$py -m mmlib check check-perf-12gb --gpu-memory 12GiB; echo "(exit $?)"
$py -m mmlib check check-perf-12gb --gpu-memory 12GiB --json > "$scratch/check-perf-12gb.json" 2>/dev/null

fit_within() {  # fit_within PROFILE TOKENS: mm's token estimate within 10% of what vLLM printed
  $py - "$scratch/$1.json" "$2" <<'PY'
import json, re, sys
doc = json.load(open(sys.argv[1]))
fit = [f for f in doc if f["rule"] == "memory-fit" and f["severity"] == "info" and "fits" in f["message"]]
tokens = int(re.search(r"= KV cache [0-9.]+ GiB: ([0-9,]+) tokens", fit[0]["message"]).group(1).replace(",", "")) if fit else 0
want = int(sys.argv[2])
print(f"   estimate {tokens:,} tokens, vLLM 0.26 printed {want:,} ({(tokens - want) / want:+.1%})")
sys.exit(0 if abs(tokens - want) <= 0.10 * want else 1)
PY
}
has_rule() {  # has_rule PROFILE RULE [SEVERITY]
  $py -c "import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if any(f['rule']==sys.argv[2] and \
f['severity']==sys.argv[3] for f in d) else 1)" "$scratch/$1.json" "$2" "${3:-error}"
}
no_errors() { $py -c "import json,sys; sys.exit(any(f['severity']=='error' for f in json.load(open(sys.argv[1]))))" \
  "$scratch/$1.json"; }
expect "check-1.5b: no errors" no_errors check-1.5b
expect "check-1.5b: fit within 10% of vLLM's 240,816 tokens" fit_within check-1.5b 240816
expect "check-7b-awq: no errors" no_errors check-7b-awq
expect "check-7b-awq: fit within 10% of vLLM's 170,784 tokens" fit_within check-7b-awq 170784
expect "check-7b-awq-fp16: refused for fp16 AWQ + fp8 KV on Hopper" has_rule check-7b-awq-fp16 awq-fp16-fp8kv-fa3
expect "check-perf-12gb: fits a 12 GiB card" has_rule check-perf-12gb memory-fit info
for r in arg-unknown arg-value arg-no-negation env-vllm-attention-backend; do
  expect "check-typo: $r" has_rule check-typo "$r"
done
expect "check-typo: one line a problem, no traceback" bash -c \
  "$py -m mmlib check check-typo | grep -c '^error' | grep -qx 6 && ! $py -m mmlib check check-typo 2>&1 | grep -q Traceback"

say "the shipped perf profile against vLLM 0.26's parser"
$py -m mmlib profiles show perf | tail -1
$py - <<'PY'
import shlex, subprocess, sys
from mmlib.profiles.vllm_args import parse_with_vllm
line = subprocess.run([sys.executable, "-m", "mmlib", "profiles", "show", "perf"], capture_output=True,
                      text=True, check=True).stdout.strip().splitlines()[-1]
words = shlex.split(line)
flags = words[words.index("serve") + 2:]  # after the model
((ok, error),) = parse_with_vllm([flags])
print("   vLLM 0.26 parser on perf's flags:", " ".join(flags))
print("   ->", "accepted" if ok else f"REJECTED: {error}")
sys.exit(0 if ok else 1)
PY
expect "perf's argv accepted by vLLM 0.26's parser" test $? -eq 0
$py -m mmlib check perf --json > "$scratch/perf.json"; $py -m mmlib check perf
expect "mm check perf: no argument errors" $py -c "import json,sys; sys.exit(any(f['rule'].startswith('arg-') and \
f['severity']=='error' for f in json.load(open(sys.argv[1]))))" "$scratch/perf.json"

say "done: $fails FAIL(s)"
exit "$fails"
