"""Who can drive mm, and how profile values reach vLLM."""
from __future__ import annotations

import stat
from pathlib import Path

import httpx
import psutil


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_control_socket_state_dir_and_logs_are_the_users_only(fake_mm):
    fake_mm.add_profile("private")
    fake_mm.mm("up", "private", "--force")
    state = Path(fake_mm.env["MM_HOME"]) / "state"
    assert mode(state) == 0o700
    assert mode(state / "mm.sock") == 0o600
    assert mode(state / "logs" / "private.log") == 0o600
    assert mode(state / "logs" / "daemon.log") == 0o600
    assert mode(state / "servers" / "private.json") == 0o600


def test_everything_listens_on_loopback_only(fake_mm):
    fake_mm.add_profile("local")
    fake_mm.mm("up", "local", "--force")
    daemon = psutil.Process(int((Path(fake_mm.env["MM_HOME"]) / "state" / "daemon.lock").read_text()))
    listening = [c.laddr.ip for c in daemon.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and set(listening) == {"127.0.0.1"}
    # The server answers only on its unix socket, in a folder only this user can enter: vLLM's
    # dev-mode endpoints (/sleep, /wake_up, /collective_rpc) are out of reach of other users.
    s = fake_mm.server("local")
    server = psutil.Process(s["pid"])
    assert not [c for c in server.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert s["uds"] and mode(Path(s["uds"]).parent) == 0o700
    assert fake_mm.direct("local").get("/health").status_code == 200


def test_a_profile_that_names_a_port_listens_on_loopback_tcp(fake_mm):
    from tests.conftest import free_port

    port = free_port()
    fake_mm.add_profile("tcp", extra=f"port = {port}")
    fake_mm.mm("up", "tcp", "--force")
    s = fake_mm.server("tcp")
    server = psutil.Process(s["pid"])
    listening = {(c.laddr.ip, c.laddr.port) for c in server.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", port)} and s["uds"] is None


def test_api_key_is_enforced_on_proxy_and_control_api(fake_mm):
    fake_mm.env["MM_API_KEY"] = "s3cret"  # the daemon reads it at start; the CLI sends it
    fake_mm.add_profile("guarded")
    fake_mm.mm("up", "guarded", "--force")
    body = {"model": "guarded", "messages": [{"role": "user", "content": "x"}]}
    assert httpx.post(f"{fake_mm.proxy}/v1/chat/completions", json=body).status_code == 401
    assert httpx.get(f"{fake_mm.proxy}/v1/models").status_code == 401
    ok = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", json=body, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    sock = str(Path(fake_mm.env["MM_HOME"]) / "state" / "mm.sock")
    control = httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://mm")
    assert control.get("/status").status_code == 401
    assert control.get("/status", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_a_key_gone_from_the_config_says_what_happened_and_daemon_stop_still_works(fake_mm):
    fake_mm.env["MM_API_KEY"] = "s3cret"
    fake_mm.add_profile("keyed")
    fake_mm.mm("up", "keyed", "--force")  # starts the daemon with the key
    fake_mm.env["MM_API_KEY"] = "other"  # config.toml's key changed
    wrong = fake_mm.mm("status", check=False)
    assert wrong.returncode == 1 and "refused this command's API key" in wrong.stderr
    del fake_mm.env["MM_API_KEY"]  # as if api_key were removed from config.toml
    refused = fake_mm.mm("status", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "started with" in refused.stderr and "`mm daemon stop` and retry" in refused.stderr
    daemon_pid = int((Path(fake_mm.env["MM_HOME"]) / "state" / "daemon.lock").read_text())
    fake_mm.mm("daemon", "stop")  # without the key: the daemon is this user's, a signal stops it
    assert not psutil.pid_exists(daemon_pid) or psutil.Process(daemon_pid).status() == psutil.STATUS_ZOMBIE
    assert fake_mm.mm("status").returncode == 0  # a fresh daemon, without a key


def test_profile_values_reach_vllm_as_argv_never_a_shell(fake_mm, tmp_path):
    marker = tmp_path / "pwned"
    fake_mm.add_profile("shelly", extra=f'[engine]\ntokenizer = "x; touch {marker}"\nrevision = "$(touch {marker})"\n')
    fake_mm.mm("up", "shelly", "--force")
    argv = fake_mm.direct('shelly').get("/argv").json()["argv"]
    assert f"x; touch {marker}" in argv and f"$(touch {marker})" in argv
    assert not marker.exists()


def test_a_page_rebinding_its_name_to_loopback_is_refused(fake_mm):
    """DNS rebinding: a site's name resolving to 127.0.0.1 must not reach the keyless endpoint."""
    fake_mm.add_profile("rebind")
    fake_mm.mm("up", "rebind", "--force")
    body = {"model": "rebind", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", json=body, headers={"host": "attacker.example"})
    assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]["message"]
    assert httpx.get(f"{fake_mm.proxy}/", headers={"host": "attacker.example:8000"}).status_code == 403  # the page
    assert httpx.post(f"{fake_mm.proxy}/v1/chat/completions", json=body).status_code == 200  # 127.0.0.1 is fine
