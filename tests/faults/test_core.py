"""The core's races and edges (issue 9), each through the real daemon, proxy and supervisor with the
fake vLLM: a daemon that stops for real, starts that can be cancelled, clients that leave, hung
engines, failing control calls, adoption of a loading server, keys from config.toml."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import ROOT
from tests.faults.test_crash import wait_for

BODY = {"messages": [{"role": "user", "content": "x"}]}


def daemon_pid(fake) -> int:
    return int((Path(fake.env["MM_HOME"]) / "state" / "daemon.lock").read_text())


def pid_of(fake, profile: str) -> int | None:
    """The server's pid once the daemon reports one (None while the daemon is still coming up)."""
    from mmlib.errors import MMError

    try:
        return {s["profile"]: s for s in fake.status()["servers"]}.get(profile, {}).get("pid")
    except MMError:
        return None


def spawn_mm(fake, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmlib", *args], cwd=ROOT, env={**os.environ, **fake.env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_daemon_stop_returns_only_when_every_server_and_the_daemon_are_gone(fake_mm):
    fake_mm.add_profile("first")
    fake_mm.mm("up", "first", "--force")
    server, daemon = fake_mm.server("first")["pid"], daemon_pid(fake_mm)
    fake_mm.mm("daemon", "stop")
    assert not psutil.pid_exists(server) and not psutil.pid_exists(daemon)
    # A command right after finds no dying daemon to accept it: it starts a new one, and no server is
    # left behind without a daemon.
    fake_mm.mm("up", "first", "--force")
    assert daemon_pid(fake_mm) != daemon and fake_mm.server("first")["state"] == "awake"


def test_a_dying_daemon_refuses_new_work(fake_mm):
    fake_mm.add_profile("slowstop", extra='[env]\nFAKE_STOP_DELAY = "3"\n')
    fake_mm.add_profile("late")
    fake_mm.mm("up", "slowstop", "--force")
    from mmlib.serve.client import Client

    client = Client(sock=Path(fake_mm.env["MM_HOME"]) / "state" / "mm.sock")
    client.post("/shutdown")
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=10, json={"model": "late", **BODY})
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    wait_for(lambda: not Path(fake_mm.env["MM_HOME"], "state", "mm.sock").exists(), timeout=40)
    assert not any("fake/late" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))


def test_status_after_the_daemon_was_killed_says_what_still_runs(fake_mm):
    fake_mm.add_profile("orphan")
    fake_mm.mm("up", "orphan", "--force")
    pid = fake_mm.server("orphan")["pid"]
    os.kill(daemon_pid(fake_mm), signal.SIGKILL)
    time.sleep(0.3)
    out = fake_mm.mm("status").stdout
    assert "not running" in out and "orphan" in out and str(pid) in out and "adopts" in out
    fake_mm.mm("stop", "--all")  # adopts, then stops
    wait_for(lambda: not psutil.pid_exists(pid))


def test_a_loading_server_can_be_stopped_at_once(fake_mm):
    fake_mm.add_profile("heavy", extra='[env]\nFAKE_START_DELAY = "120"\n')
    up = spawn_mm(fake_mm, "up", "heavy", "--force")
    pid = wait_for(lambda: pid_of(fake_mm, "heavy"), timeout=30)
    t0 = time.monotonic()
    fake_mm.mm("stop", "heavy")
    assert time.monotonic() - t0 < 20  # SIGTERM is enough for the fake; never the 120 s load
    assert not psutil.pid_exists(pid) and fake_mm.server("heavy")["state"] == "stopped"
    out, err = up.communicate(timeout=20)
    assert up.returncode == 1 and "cancelled" in err and "Traceback" not in err


def test_a_client_that_leaves_a_non_streaming_request_frees_the_model(fake_mm):
    fake_mm.add_profile("slow", extra='[env]\nFAKE_TOKENS = "100"\nFAKE_TOKEN_DELAY = "0.1"\n')
    fake_mm.mm("up", "slow", "--force")
    try:
        httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=1.0, json={"model": "slow", **BODY})
    except httpx.ReadTimeout:
        pass  # the client gave up after 1 s of a 10 s answer
    wait_for(lambda: "aborted" in fake_mm.calls("slow"), timeout=5)
    wait_for(lambda: fake_mm.server("slow")["in_flight"] == 0, timeout=5)


def test_a_client_that_gives_up_during_a_switch_is_not_forwarded(fake_mm):
    fake_mm.add_profile("awake1")
    fake_mm.add_profile("loading", extra='[env]\nFAKE_START_DELAY = "3"\n')
    fake_mm.mm("up", "awake1", "--force")
    try:
        httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=1.0, json={"model": "loading", **BODY})
    except httpx.ReadTimeout:
        pass
    wait_for(lambda: fake_mm.server("loading")["state"] == "awake", timeout=20)
    time.sleep(0.5)
    assert "request" not in fake_mm.calls("loading") and fake_mm.server("loading")["in_flight"] == 0


def test_a_hung_engine_does_not_hold_a_switch(fake_mm):
    cfg = Path(fake_mm.env["MM_HOME"]) / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("upstream_timeout = 2\n")
    fake_mm.add_profile("hung", extra='[env]\nFAKE_HANG = "1"\n')
    fake_mm.add_profile("next")
    fake_mm.mm("up", "hung", "--force")
    results = {}

    def ask():
        results["hung"] = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=30,
                                     json={"model": "hung", **BODY}).status_code
    t = threading.Thread(target=ask)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=30, json={"model": "next", **BODY})
    assert r.status_code == 200 and time.monotonic() - t0 < 10
    t.join(10)
    assert results["hung"] == 502


def test_a_failing_sleep_is_one_line_not_a_traceback(fake_mm):
    fake_mm.add_profile("broken", extra='[env]\nFAKE_CONTROL_FAIL = "1"\n')
    fake_mm.mm("up", "broken", "--force")
    r = fake_mm.mm("sleep", "broken", check=False)
    assert r.returncode == 1 and "sleep (level 1) answered HTTP 500" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert fake_mm.server("broken")["state"] == "failed"


def test_a_new_daemon_adopts_a_server_that_is_still_loading(fake_mm):
    fake_mm.add_profile("loader", extra='[env]\nFAKE_START_DELAY = "4"\n')
    up = spawn_mm(fake_mm, "up", "loader", "--force")
    pid = wait_for(lambda: pid_of(fake_mm, "loader"), timeout=30)
    os.kill(daemon_pid(fake_mm), signal.SIGKILL)
    up.communicate(timeout=20)
    fake_mm.mm("status")
    fake_mm.add_profile("bystander")
    fake_mm.mm("up", "bystander", "--force", check=False)  # any command brings a daemon back
    wait_for(lambda: fake_mm.server("loader")["state"] in ("awake", "asleep"), timeout=30)
    assert fake_mm.server("loader")["pid"] == pid  # adopted, not killed and restarted


def test_the_cli_reads_the_api_key_from_config_toml(fake_mm):
    cfg = Path(fake_mm.env["MM_HOME"]) / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('api_key = "from-config"\n')
    fake_mm.add_profile("keyed")
    fake_mm.mm("up", "keyed", "--force")
    assert "keyed" in fake_mm.mm("status").stdout
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=10, json={"model": "keyed", **BODY})
    assert r.status_code == 401
    assert fake_mm.mm("chat", "keyed", "--once", "hi").returncode == 0


def test_secrets_reach_vllm_by_environment_never_argv_and_show_masks_them(fake_mm):
    fake_mm.add_profile("secret", extra='api_key = "upstream-key"\n[env]\nHF_TOKEN = "hf_abc123"\n')
    fake_mm.mm("up", "secret", "--force")
    pid = fake_mm.server("secret")["pid"]
    cmdline = " ".join(psutil.Process(pid).cmdline())
    assert "upstream-key" not in cmdline and "hf_abc123" not in cmdline
    # The proxy adds the upstream key itself: a client of mm's endpoint needs none.
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=10, json={"model": "secret", **BODY})
    assert r.status_code == 200
    shown = fake_mm.mm("profiles", "show", "secret").stdout
    assert "upstream-key" not in shown and "hf_abc123" not in shown and "***" in shown


def test_an_oversized_body_gets_413(fake_mm):
    cfg = Path(fake_mm.env["MM_HOME"]) / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("max_body_mib = 1\n")
    fake_mm.add_profile("small")
    fake_mm.mm("up", "small", "--force")
    big = {"model": "small", "messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=10, json=big)
    assert r.status_code == 413 and "max_body_mib" in r.json()["error"]["message"]


def test_listening_on_all_interfaces_without_a_key_is_refused(fake_mm):
    from tests.conftest import run_mm

    r = run_mm("daemon", env={**fake_mm.env, "MM_PROXY_HOST": "0.0.0.0"}, check=False, timeout=30)
    assert r.returncode == 1 and "proxy_host" in r.stderr and "api_key" in r.stderr
    assert "Traceback" not in r.stderr


def test_startup_timeout_applies_to_each_phase_and_status_shows_it(fake_mm):
    # Six seconds of start in four phases, none longer than 2 s: not cut off by a 3 s timeout.
    fake_mm.add_profile("phased", startup_timeout=3, extra='[env]\nFAKE_START_DELAY = "6"\nFAKE_START_PHASES = "1"\n')
    up = spawn_mm(fake_mm, "up", "phased", "--force")
    seen = set()

    def phase():
        from mmlib.errors import MMError

        try:
            s = {s["profile"]: s for s in fake_mm.status()["servers"]}.get("phased") or {}
        except MMError:
            return None
        if s.get("phase"):
            seen.add(s["phase"]["name"])
        return s.get("state") == "awake"
    wait_for(phase, timeout=40, step=0.2)
    up.communicate(timeout=20)
    assert up.returncode == 0 and {"loading weights", "KV cache"} & seen


def test_a_start_stuck_in_one_phase_fails_after_startup_timeout(fake_mm):
    fake_mm.add_profile("stuck", startup_timeout=2, extra='restart = "no"\n[env]\nFAKE_START_DELAY = "60"\n')
    t0 = time.monotonic()
    r = fake_mm.mm("up", "stuck", "--force", check=False)
    assert r.returncode == 1 and "no progress for 2 s while starting" in r.stderr
    assert time.monotonic() - t0 < 30
