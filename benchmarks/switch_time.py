"""Model switch time on a GPU, through mm, beside raw vLLM sleep + wake + request from the same run.

Needs a GPU build of vLLM. Two profiles (default: the ../shared/gpu random-weight models, 0.125 of
the GPU each) are started by mm; then requests alternate between the two models through mm's proxy,
each one forcing a switch (sleep the awake one, wake the other). Time to first token of a 16-token
streaming request is the figure. Then the same switch done by hand against the servers directly.

Usage: python3 benchmarks/switch_time.py --models-dir .gpu-stage/models [--rounds 10] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT, mm

PROFILE = """
model = "{path}"
served_model_name = "{name}"
startup_timeout = 600
[sleep]
enabled = true
level = 1
[engine]
load_format = "dummy"
gpu_memory_utilization = 0.125
max_model_len = 4096
enforce_eager = true
{extra}
"""



def first_token_s(base: str, model: str) -> float:
    body = {"model": model, "max_tokens": 16, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Say something."}]}
    t0 = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - t0
    return first if first is not None else float("nan")


def full_request_s(base: str, model: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{base}/v1/chat/completions", timeout=300, json={
        "model": model, "max_tokens": 16, "ignore_eos": True, "messages": [{"role": "user", "content": "Hi"}]})
    r.raise_for_status()
    return time.perf_counter() - t0


def summary(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", type=Path, default=ROOT / ".gpu-stage" / "models")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mm-switch-"))
    env = {**os.environ, "MM_HOME": str(home), "MM_CACHE_DIR": str(home / "cache")}
    proxy_port = env.setdefault("MM_PROXY_PORT", "8000")
    proxy = f"http://127.0.0.1:{proxy_port}"
    d = home / "config" / "profiles"
    d.mkdir(parents=True)
    models = {"small": (args.models_dir / "dummy-1.5b", ""),
              "awq7b": (args.models_dir / "dummy-7b-awq", 'dtype = "bfloat16"\nquantization = "awq_marlin"')}
    for name, (path, extra) in models.items():
        (d / f"{name}.toml").write_text(PROFILE.format(path=path.resolve(), name=name, extra=extra))
    lines = []
    try:
        t0 = time.perf_counter()
        mm(env, "up", "small", "--force")
        lines.append(f"start small (cold): {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        mm(env, "up", "awq7b", "--force")
        lines.append(f"start awq7b while small sleeps: {time.perf_counter() - t0:.1f} s")
        # Warm both paths once (first sleep of a process is slow: 3-6 s).
        for model in ("small", "awq7b", "small", "awq7b"):
            first_token_s(proxy, model)
        through_mm = []
        for i in range(args.rounds):
            model = "small" if i % 2 == 0 else "awq7b"
            through_mm.append(first_token_s(proxy, model))
        status = json.loads(mm(env, "status", "--json"))
        states = {s["profile"]: s["state"] for s in status["servers"]}
        lines.append(f"states after: {states}; daemon's last switch {status['last_switch_s']:.3f} s")
        lines.append(f"through mm, request for the sleeping model -> first token: {summary(through_mm)}")

        urls = {s["profile"]: s["url"] for s in status["servers"]}
        awake = next(n for n, st in states.items() if st == "awake")
        raw, sleeps, wakes = [], [], []
        with httpx.Client(timeout=300) as c:
            for i in range(args.rounds):
                target = "small" if awake == "awq7b" else "awq7b"
                t0 = time.perf_counter()
                c.post(f"{urls[awake]}/sleep", params={"level": 1}).raise_for_status()
                t1 = time.perf_counter()
                c.post(f"{urls[target]}/wake_up").raise_for_status()
                t2 = time.perf_counter()
                full_request_s(urls[target], target)
                raw.append(time.perf_counter() - t0)
                sleeps.append(t1 - t0)
                wakes.append(t2 - t1)
                awake = target
        lines.append(f"raw vLLM sleep: {summary(sleeps)}")
        lines.append(f"raw vLLM wake_up: {summary(wakes)}")
        lines.append(f"raw vLLM sleep + wake_up + 16-token request: {summary(raw)}")
        lines.append(f"ratio mm first token / raw switch+request (medians): "
                     f"{statistics.median(through_mm) / statistics.median(raw):.2f}")
    finally:
        subprocess.run([sys.executable, "-m", "mmlib", "daemon", "stop"], env=env, cwd=ROOT)
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
