"""Crashes: of a server, of its engine process, and of the daemon itself."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil


def wait_for(fn, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def gone(pid: int) -> bool:
    """Exited (a zombie waits only for its parent to reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def state_of(fake, profile):
    return fake.server(profile)["state"]


def detection_time(fake, profile, pid) -> float:
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: state_of(fake, profile) in ("failed", "starting"), step=0.01)
    return time.monotonic() - t0


def test_killed_server_is_noticed_within_a_second_and_restarted(fake_mm):
    fake_mm.add_profile("crashy")
    fake_mm.mm("up", "crashy", "--force")
    pid = fake_mm.server("crashy")["pid"]
    assert detection_time(fake_mm, "crashy", pid) < 1.0
    s = wait_for(lambda: (lambda s: s if s["state"] == "awake" else None)(fake_mm.server("crashy")))
    assert s["pid"] != pid and s["restarts"] == 1  # restart = "on-failure" (the default)


def test_killed_engine_process_fails_the_server(fake_mm):
    fake_mm.add_profile("noengine", extra='restart = "no"')
    fake_mm.mm("up", "noengine", "--force")
    api_server = fake_mm.server("noengine")["pid"]
    engine = fake_mm.direct("noengine").get("/argv").json()["engine_pid"]
    assert api_server and psutil.pid_exists(api_server)
    assert detection_time(fake_mm, "noengine", engine) < 1.0
    s = fake_mm.server("noengine")
    assert s["state"] == "failed" and "engine process" in s["error"] and s["error_log"]
    wait_for(lambda: gone(api_server), timeout=5.0)  # the half-dead API server was killed too


def test_failed_server_without_restart_answers_503_at_once(fake_mm):
    fake_mm.add_profile("once", extra='restart = "no"')
    fake_mm.mm("up", "once", "--force")
    os.kill(fake_mm.server("once")["pid"], signal.SIGKILL)
    wait_for(lambda: state_of(fake_mm, "once") == "failed")
    t0 = time.monotonic()
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=10,
                   json={"model": "once", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.headers["retry-after"] and "mm up once" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 1.0
    fake_mm.mm("up", "once", "--force")  # the user asking again starts it
    assert state_of(fake_mm, "once") == "awake"


def test_request_in_flight_gets_a_clear_error_when_the_server_dies(fake_mm):
    fake_mm.add_profile("dying", extra='restart = "no"\n[env]\nFAKE_TOKENS = "500"\nFAKE_TOKEN_DELAY = "0.02"\n')
    fake_mm.mm("up", "dying", "--force")
    pid = fake_mm.server("dying")["pid"]
    lines = []
    with httpx.stream("POST", f"{fake_mm.proxy}/v1/chat/completions", timeout=10, json={
            "model": "dying", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 6:
                os.kill(pid, signal.SIGKILL)
    assert any('"error"' in line and "dying" in line for line in lines[6:])


def test_daemon_killed_then_restarted_adopts_the_running_server(fake_mm):
    fake_mm.add_profile("survivor")
    fake_mm.mm("up", "survivor", "--force")
    before = fake_mm.server("survivor")
    home = Path(fake_mm.env["MM_HOME"])
    daemon_pid = int((home / "state" / "daemon.lock").read_text())
    os.kill(daemon_pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(daemon_pid) or psutil.Process(daemon_pid).status() == "zombie")
    # The server outlives its daemon (its own session) and its state file says where it is.
    assert psutil.pid_exists(before["pid"])
    record = json.loads((home / "state" / "servers" / "survivor.json").read_text())
    assert record["pid"] == before["pid"]
    fake_mm.mm("up", "survivor", "--force")  # any command brings a daemon back
    after = fake_mm.server("survivor")
    assert after["state"] == "awake" and after["pid"] == before["pid"]
    assert httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=10, json={
        "model": "survivor", "messages": [{"role": "user", "content": "x"}]}).status_code == 200
    fake_mm.mm("stop", "survivor")
    wait_for(lambda: not psutil.pid_exists(before["pid"]))


def test_stale_state_file_of_a_dead_server_is_cleaned(fake_mm):
    fake_mm.add_profile("ghost")
    fake_mm.mm("up", "ghost", "--force")
    home = Path(fake_mm.env["MM_HOME"])
    pid = fake_mm.server("ghost")["pid"]
    daemon_pid = int((home / "state" / "daemon.lock").read_text())
    os.kill(daemon_pid, signal.SIGKILL)
    os.killpg(pid, signal.SIGKILL)
    time.sleep(0.3)
    fake_mm.mm("status")  # status alone does not start a daemon
    fake_mm.mm("up", "model-x", "--force", check=False)
    assert not (home / "state" / "servers" / "ghost.json").exists()
    assert "ghost" not in {s["profile"] for s in fake_mm.status()["servers"]}
