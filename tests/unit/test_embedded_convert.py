"""The embedded model's conversion runs once: a start that finds one under way (the one `mm chat` began
while its checks ran) waits for it instead of converting again, and a failed command stops the one it
began. Real helper processes; no conversion (the model is "ready" by the time the lock is free)."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import pytest

from mmlib.profiles import embedded
from tests.conftest import ROOT


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_CACHE_DIR", str(tmp_path / "cache"))
    embedded.model_dir().parent.mkdir(parents=True)
    return embedded.model_dir()


def test_a_second_conversion_waits_for_the_first_and_then_converts_nothing(cache):
    lock_file = cache.parent / f".{cache.name}.lock"
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a conversion under way
        proc = subprocess.Popen([sys.executable, "-m", "mmlib.profiles.embedded_convert", str(cache)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        assert proc.poll() is None, proc.stdout.read()
        cache.mkdir()
        (cache / "config.json").write_text("{}")  # ... which finishes
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "waiting for the embedded model's conversion already under way" in out
    assert "converting the embedded model" not in out
    assert not any(p.name.startswith("tmp") for p in cache.parent.iterdir())


def fake_python(tmp_path, body: str) -> str:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_the_conversion_runs_while_the_caller_works_and_is_stopped_if_it_fails(cache, tmp_path):
    started = tmp_path / "started"
    python = fake_python(tmp_path, f"echo $$ > {started}; exec sleep 60")
    log = tmp_path / "convert.log"
    with pytest.raises(RuntimeError):
        with embedded.converting_meanwhile(["embedded:SmolLM2-135M-Instruct"], log, python=python):
            deadline = time.time() + 10
            while not (started.exists() and started.read_text().strip()) and time.time() < deadline:
                time.sleep(0.05)
            pid = int(started.read_text())
            os.kill(pid, 0)  # it runs while the caller works
            raise RuntimeError("the checks failed")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_nothing_is_started_for_other_models_or_a_ready_one(cache, tmp_path):
    python = fake_python(tmp_path, f"touch {tmp_path / 'ran'}")
    with embedded.converting_meanwhile(["Qwen/Qwen2.5-7B-Instruct-AWQ"], tmp_path / "log", python=python):
        pass
    cache.mkdir()
    (cache / "config.json").write_text("{}")
    with embedded.converting_meanwhile(["embedded:SmolLM2-135M-Instruct"], tmp_path / "log", python=python):
        pass
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_conversion_log_is_private(cache, tmp_path, umask):
    log = tmp_path / "embedded-convert.log"
    old = os.umask(umask)
    try:
        with embedded.converting_meanwhile(["embedded:SmolLM2-135M-Instruct"], log, python=fake_python(tmp_path, "")):
            pass
    finally:
        os.umask(old)
    assert log.stat().st_mode & 0o777 == 0o600
