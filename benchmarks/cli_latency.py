"""How fast the CLI answers: `mm status` with a server running (fake vLLM), median of 20 runs.

Run: .venv/bin/python benchmarks/cli_latency.py   (target: well under 0.3 s)
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.conftest import free_port  # noqa: E402


def main() -> None:
    home = tempfile.mkdtemp(prefix="mm-cli-")
    env = {**os.environ, "MM_HOME": home, "MM_PROXY_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests/faults/fakevllm"), str(ROOT)])}
    d = Path(home) / "config" / "profiles"
    d.mkdir(parents=True)
    (d / "fake.toml").write_text('model = "fake/model"\n')
    mm = [sys.executable, "-m", "mmlib"]
    subprocess.run([*mm, "up", "fake", "--force"], env=env, check=True, capture_output=True)
    try:
        times = {}
        for args in (["status"], ["status", "--json"], ["--help"]):
            runs = []
            for _ in range(20):
                t0 = time.perf_counter()
                subprocess.run([*mm, *args], env=env, check=True, capture_output=True)
                runs.append(time.perf_counter() - t0)
            times[" ".join(args)] = statistics.median(runs)
    finally:
        subprocess.run([*mm, "daemon", "stop"], env=env, capture_output=True)
    for cmd, t in times.items():
        print(f"mm {cmd:<14} median {t * 1000:.0f} ms over 20 runs (server running; target < 300 ms)")


if __name__ == "__main__":
    main()
