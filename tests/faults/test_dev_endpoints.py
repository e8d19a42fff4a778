"""vLLM's dev endpoints (/sleep, /wake_up, /collective_rpc; --api-key does not guard them) through the
real daemon and supervisor: dev mode only where sleep mode needs it, never beyond loopback."""
from __future__ import annotations

import psutil

from tests.conftest import free_port


def test_dev_mode_only_for_a_server_that_sleeps(fake_mm):
    fake_mm.env["VLLM_SERVER_DEV_MODE"] = "1"  # in the user's shell: the daemon and its servers inherit it
    fake_mm.add_profile("tcp", sleep=False, extra=f"port = {free_port()}")
    fake_mm.add_profile("sleeper")
    fake_mm.mm("up", "tcp", "--force")
    assert "VLLM_SERVER_DEV_MODE" not in psutil.Process(fake_mm.server("tcp")["pid"]).environ()
    fake_mm.mm("up", "sleeper", "--force")
    assert psutil.Process(fake_mm.server("sleeper")["pid"]).environ()["VLLM_SERVER_DEV_MODE"] == "1"


def test_sleep_mode_beyond_loopback_is_refused_in_one_line(fake_mm):
    fake_mm.add_profile("lan", extra='host = "0.0.0.0"\napi_key = "k"')
    r = fake_mm.mm("up", "lan", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = [line for line in r.stderr.splitlines() if "lan.toml" in line]
    assert "host: sleep mode on 0.0.0.0" in line and "/collective_rpc" in line and 'host = "127.0.0.1"' in line
