"""`mm batch` through a real daemon and proxy to the fake vLLM: retries on 5xx, failures reported and
sent again by the next run, Ctrl-C then resume, a mismatched output refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def batch_mm(shared_fake_mm):
    shared_fake_mm.add_profile("bulk")
    # 4 tokens at 0.05 s: a request takes 0.2 s, long enough to interrupt a run halfway
    shared_fake_mm.add_profile("slowbulk", extra='[env]\nFAKE_TOKENS = "4"\nFAKE_TOKEN_DELAY = "0.05"\n')
    return shared_fake_mm


def prompts(path: Path, texts: dict) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in texts.items()))
    return path


def pairs(path: Path) -> list[tuple]:
    return sorted((d["id"], d["sample"]) for d in map(json.loads, path.read_text().splitlines()))


def test_5xx_is_retried_what_still_fails_is_reported_and_sent_again(batch_mm, tmp_path):
    texts = {i: f"question {i}" for i in range(12)}
    texts[3] += " [fake:fail-twice]"
    texts[7] += " [fake:fail-always]"
    texts[9] += " [fake:bad-request]"
    inp, out = prompts(tmp_path / "in.jsonl", texts), tmp_path / "out.jsonl"
    args = ("batch", "bulk", str(inp), "-o", str(out), "-n", "2", "--temperature", "0.8", "--retries", "2", "--force")
    r = batch_mm.mm(*args, check=False)
    assert r.returncode == 1, r.stderr
    assert pairs(out) == sorted((i, k) for i in texts if i not in (7, 9) for k in (0, 1))  # 3 passed on its third try
    failed = {d["id"]: d for d in map(json.loads, (tmp_path / "out.errors.jsonl").read_text().splitlines())}
    assert set(failed) == {7, 9}
    assert (failed[7]["status"], failed[7]["attempts"], failed[7]["samples"]) == (500, 3, [0, 1])
    assert (failed[9]["status"], failed[9]["attempts"]) == (400, 1)  # a 400 is not retried
    assert "wrote 20 samples" in r.stderr and "4 failed (2 requests)" in r.stderr and "sends them again" in r.stderr
    doc = json.loads(out.read_text().splitlines()[0])
    assert doc["model"] == "bulk" and doc["finish_reason"] == "length" and doc["usage"]["completion_tokens"] == 8

    again = batch_mm.mm(*args, check=False)  # only the two failed ones are sent again
    assert again.returncode == 1
    assert "resuming: 20 of 24 samples" in again.stderr and "wrote 0 samples" in again.stderr
    assert len(out.read_text().splitlines()) == 20


def test_greedy_samples_and_a_mismatched_output(batch_mm, tmp_path):
    inp, out = prompts(tmp_path / "in.jsonl", {"a": "x", "b": "y"}), tmp_path / "out.jsonl"
    # temperature 0 takes no n in vLLM (the fake refuses it too): one request per sample
    r = batch_mm.mm("batch", "bulk", str(inp), "-o", str(out), "-n", "3", "--temperature", "0", "--force")
    assert pairs(out) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert "will be alike" in r.stderr
    r = batch_mm.mm("batch", "bulk", str(inp), "-o", str(out), "-n", "3", "--force")
    assert "nothing to do" in r.stderr
    other = tmp_path / "other.jsonl"
    other.write_text(out.read_text().replace('"a"', '"zz"', 1))
    before = other.read_bytes()
    r = batch_mm.mm("batch", "bulk", str(inp), "-o", str(other), "-n", "4", "--force", check=False)
    assert r.returncode == 1 and f"{other}:1: id \"zz\" is not in {inp}" in r.stderr
    assert other.read_bytes() == before
    r = batch_mm.mm("batch", "slowbulk", str(inp), "-o", str(out), "-n", "4", "--force", check=False)
    assert r.returncode == 1 and "holds samples of bulk and this run's model is slowbulk" in r.stderr
    assert len(out.read_text().splitlines()) == 6


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_keeps_what_finished_and_the_same_command_resumes(batch_mm, tmp_path, stop):
    inp, out = prompts(tmp_path / "in.jsonl", {i: f"q{i}" for i in range(60)}), tmp_path / "out.jsonl"
    args = ["batch", "slowbulk", str(inp), "-o", str(out), "-n", "2", "--temperature", "1", "--concurrency", "2",
            "--force"]
    batch_mm.mm("up", "slowbulk", "--force")  # started before: the run below is interrupted mid-way, not mid-start
    proc = subprocess.Popen([sys.executable, "-m", "mmlib", *args], cwd=ROOT, env={**os.environ, **batch_mm.env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 20):
        time.sleep(0.02)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert f"what finished is kept in {out}. To resume: mm batch slowbulk" in err
    kept = pairs(out)
    assert 20 <= len(kept) < 120 and len(set(kept)) == len(kept)
    assert all((i, 1 - k) in kept for i, k in kept)  # a request's samples are written together

    r = batch_mm.mm(*args)
    assert f"resuming: {len(kept)} of 120 samples" in r.stderr
    assert pairs(out) == sorted((i, k) for i in range(60) for k in (0, 1))
