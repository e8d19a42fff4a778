"""The walking skeleton, for real: mm starts vLLM (CPU) on the embedded model, chats, stops it."""
from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow


def user_profile(live, name: str, text: str) -> None:
    d = Path(live.env["MM_HOME"]) / "config" / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(text)


def test_chat_once_answers_through_mm(live_mm):
    out = live_mm.mm("chat", "--once", "What is the capital of France?", "--temperature", "0")
    assert "Paris" in out.stdout


def test_status_shows_the_server_ready(live_mm):
    servers = {s["profile"]: s for s in live_mm.status()["servers"]}
    s = servers["default"]
    assert s["state"] == "awake" and s["pid"]
    # vLLM 0.32 has --uds: the server listens on a socket in a folder only this user can enter
    assert s["uds"] and s["url"] == f"unix:{s['uds']}" and s["port"] is None
    assert os.stat(os.path.dirname(s["uds"])).st_mode & 0o777 == 0o700
    assert s["switch"] == "stop/start"  # the CPU build has no sleep mode
    table = live_mm.mm("status").stdout
    assert "default" in table and "awake" in table


def test_logs_show_the_vllm_log(live_mm):
    out = live_mm.mm("logs", "default", "-n", "100000").stdout  # the shared server has logged every test's requests
    assert "mm: starting default" in out


def test_unknown_profile_is_one_line(live_mm):
    r = live_mm.mm("up", "no-such-profile", check=False)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "no such profile" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.changes_live
def test_missing_model_path_is_one_line(live_mm):
    user_profile(live_mm, "nopath", 'model = "/nonexistent/model"\n')
    r = live_mm.mm("up", "nopath", "--force", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.changes_live
def test_port_in_use_is_one_line(live_mm):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        user_profile(live_mm, "busyport", f'model = "embedded:SmolLM2-135M-Instruct"\nport = {port}\n')
        r = live_mm.mm("up", "busyport", "--force", check=False)
    assert r.returncode == 1 and "already in use" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.changes_live
def test_server_that_dies_at_startup_shows_its_log(live_mm):
    user_profile(live_mm, "dies", 'model = "embedded:SmolLM2-135M-Instruct"\n'
                                  '[engine]\nenforce_eager = true\nmax_model_len = "not-a-number"\n')
    r = live_mm.mm("up", "dies", "--force", check=False, timeout=300)
    assert r.returncode == 1
    assert "exited during start-up" in r.stderr and "| " in r.stderr  # the log's last lines
    assert "Traceback (most recent call last)" not in r.stderr.split("last lines of")[0]
    states = {s["profile"]: s["state"] for s in live_mm.status()["servers"]}
    assert states["dies"] == "failed"


@pytest.mark.changes_live
def test_killed_vllm_engine_is_noticed_and_restarted(live_mm):
    """kill -9 of real vLLM's engine process: failed within 1 s, then restarted by the policy."""
    import os
    import signal

    live_mm.mm("up", "default")
    before = {s["profile"]: s for s in live_mm.status()["servers"]}["default"]
    engine = psutil.Process(before["pid"]).children(recursive=True)[-1]
    t0 = time.monotonic()
    os.kill(engine.pid, signal.SIGKILL)
    while time.monotonic() - t0 < 5:
        s = {s["profile"]: s for s in live_mm.status()["servers"]}["default"]
        if s["state"] in ("failed", "starting"):
            break
    detected = time.monotonic() - t0
    assert s["state"] in ("failed", "starting") and detected < 1.0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and s["state"] != "awake":
        time.sleep(1)
        s = {s["profile"]: s for s in live_mm.status()["servers"]}["default"]
    assert s["state"] == "awake" and s["restarts"] == 1 and s["pid"] != before["pid"]
    assert live_mm.chat("Say hi")["choices"][0]["message"]["content"]


@pytest.mark.changes_live
def test_stop_leaves_no_process(live_mm):
    live_mm.mm("up", "default")
    s = {s["profile"]: s for s in live_mm.status()["servers"]}["default"]
    family = [psutil.Process(s["pid"])] + psutil.Process(s["pid"]).children(recursive=True)
    assert len(family) >= 2  # the API server and vLLM's engine process
    live_mm.mm("stop", "default")
    time.sleep(0.5)
    alive = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    states = {s["profile"]: s["state"] for s in live_mm.status()["servers"]}
    assert states["default"] == "stopped"
