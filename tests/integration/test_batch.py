"""Issue 23's done-when for `mm batch`, on real vLLM (CPU, the embedded model, the session's server):
200 prompts x 2 samples, the run killed (SIGKILL) halfway, then the same command again: every
(id, sample) exactly once, in a valid JSONL file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "a cat", "bread", "the moon", "trains", "rain", "a garden", "music", "snow", "a city"]


def test_batch_killed_halfway_then_resumed_has_every_sample_once(live_mm, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say one thing about {TOPICS[i % 10]} ({i})."})
                           + "\n" for i in range(200)))
    # sampling (temperature 0.8): each prompt's two samples are one request with n=2, as vLLM's parallel sampling
    args = ["batch", "smollm2", str(inp), "-o", str(out), "-n", "2", "--max-tokens", "8", "--temperature", "0.8",
            "--seed", "7", "--concurrency", "16"]
    proc = subprocess.Popen([sys.executable, "-m", "mmlib", *args], cwd=ROOT, env={**os.environ, **live_mm.env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            (not out.exists() or out.read_bytes().count(b"\n") < 200):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    at_kill = out.read_bytes().count(b"\n")
    assert 0 < at_kill < 400, f"killed with {at_kill} lines written"

    r = live_mm.mm(*args, timeout=300)
    assert "resuming:" in r.stderr and "0 failed" in r.stderr, r.stderr
    lines = out.read_text().splitlines()
    docs = [json.loads(line) for line in lines]  # the whole file is valid JSONL
    assert sorted((d["id"], d["sample"]) for d in docs) == sorted((f"p{i}", k) for i in range(200) for k in (0, 1))
    assert {d["model"] for d in docs} == {"smollm2"}
    assert all(d["finish_reason"] in ("stop", "length") and 0 < d["usage"]["completion_tokens"] <= 8
               and d["usage"]["prompt_tokens"] > 5 for d in docs)
    assert sum(bool(d["text"].strip()) for d in docs) > 390
    assert not (tmp_path / "answers.errors.jsonl").exists()
