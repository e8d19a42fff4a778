"""Shared fixtures. Every test gets its own MM_HOME (config, state, logs) and proxy port; the
converted embedded model is cached once per machine (MM_CACHE_DIR) so it is not rebuilt per test."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_CACHE = Path(os.environ.get("MM_TEST_CACHE", Path.home() / ".cache" / "mm-tests"))


def runtime_dir() -> str:
    """A short private folder for servers' unix sockets (a socket path must fit in 108 bytes,
    which pytest's temp paths do not)."""
    import tempfile

    return tempfile.mkdtemp(prefix="mm-", dir="/tmp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mm_env(tmp_path, monkeypatch):
    """An isolated mm: its own home and proxy port, the shared model cache."""
    env = {"MM_HOME": str(tmp_path / "home"), "MM_CACHE_DIR": str(SHARED_CACHE), "MM_RUNTIME_DIR": runtime_dir(),
           "MM_PROXY_PORT": str(free_port()), "MM_RESULTS_DIR": str(tmp_path / "results")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MM_API_KEY", raising=False)
    monkeypatch.delenv("MM_GPU_BUDGET", raising=False)
    return env


def run_mm(*args: str, env: dict | None = None, timeout: float = 900, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, the way a user does (python -m mmlib == ./mm after set-up)."""
    proc = subprocess.run([sys.executable, "-m", "mmlib", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"mm {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                             f"stderr: {proc.stderr}")
    return proc


def direct_client(server: dict, timeout: float = 300) -> httpx.Client:
    """A client straight to a server (not through mm's proxy), over its unix socket where it has one."""
    if server.get("uds"):
        return httpx.Client(transport=httpx.HTTPTransport(uds=server["uds"]), base_url="http://mm-upstream",
                            timeout=timeout)
    return httpx.Client(base_url=server["url"], timeout=timeout)


class LiveMM:
    """A real daemon serving the embedded model on real vLLM (CPU), shared by a test module."""

    def __init__(self, env: dict):
        self.env = env
        self.proxy = f"http://127.0.0.1:{env['MM_PROXY_PORT']}"

    def mm(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_mm(*args, env=self.env, **kw)

    def status(self) -> dict:
        """Straight from the control socket: polling through a CLI subprocess would blur timings."""
        from mmlib.serve.client import Client

        sock = Path(self.env["MM_HOME"]) / "state" / "mm.sock"
        return Client(sock=sock, api_key=self.env.get("MM_API_KEY")).get("/status")

    def direct(self, profile: str) -> httpx.Client:
        return direct_client({s["profile"]: s for s in self.status()["servers"]}[profile])

    def chat(self, content: str, model: str = "smollm2", max_tokens: int = 16, **extra) -> dict:
        r = httpx.post(f"{self.proxy}/v1/chat/completions", timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            **extra})
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="session")
def live_mm(tmp_path_factory):
    """One vLLM start (~45-90 s on CPU) serves every integration test of the session. A test that
    stops, kills, switches away from or breaks its server is marked `changes_live`: it runs after
    the tests that need the server as it was started (see pytest_collection_modifyitems)."""
    home = tmp_path_factory.mktemp("mm")
    env = {"MM_HOME": str(home / "home"), "MM_CACHE_DIR": str(SHARED_CACHE), "MM_RUNTIME_DIR": runtime_dir(),
           "MM_PROXY_PORT": str(free_port()), "MM_RESULTS_DIR": str(home / "results")}
    live = LiveMM(env)
    live.mm("up", "default")
    yield live
    live.mm("daemon", "stop", check=False)
    deadline = time.time() + 60
    while time.time() < deadline and (Path(env["MM_HOME"]) / "state" / "mm.sock").exists():
        time.sleep(0.2)


REAL_VLLM = "real-vllm"  # the xdist group of every test that starts real vLLM: one worker runs them in turn


def pytest_configure(config):
    config.addinivalue_line("markers", "changes_live: stops, kills, switches or breaks live_mm's server "
                                       "(runs after the tests that share it as started)")


def shares_module_state(item) -> bool:
    """Whether the test uses a fixture kept for its module (a daemon, a browser)."""
    fixtures = item._fixtureinfo.name2fixturedefs.values()
    return any(defs[-1].scope in ("module", "class", "package") for defs in fixtures)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Real vLLM on the CPU takes both cores: its tests run in turn on one xdist worker (group
    REAL_VLLM, sent out first as the longest), the shared server's changers last among them. Tests
    sharing a module's fixture go to one worker too, which starts it once."""
    def rank(item) -> tuple[int, int]:
        slow = item.get_closest_marker("slow") is not None or "live_mm" in item.fixturenames
        return (0 if slow else 1, 1 if item.get_closest_marker("changes_live") else 0)

    for item in items:
        if rank(item)[0] == 0:
            item.add_marker(pytest.mark.xdist_group(REAL_VLLM))
        elif shares_module_state(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=rank)
    if config.getoption("loadgroup", default=False):  # an xdist worker of --dist loadgroup
        name_groups(items)


def name_groups(items) -> None:
    """Append each test's xdist group to its node id, which is what the scheduler reads: pytest-xdist
    3.8 writes it to `item._nodeid`, which pytest 9 no longer reads (its groups were ignored)."""
    from _pytest.nodeid import coerce_node_id

    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and not item.nodeid.endswith("@" + "_".join(groups)):
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")
