"""The bootstrap names PyTorch's index itself. With this machine's pip and uv configuration switched off
(here pip finds the CPU torch only through its configured wheel folder), the bootstrap's own install
takes torch from the index MM_TORCH_INDEX names: a PEP 503 index served by the test from that wheel.
Only torch is installed (--no-deps) into a throwaway venv: the point is where it came from."""
from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
import venv
from pathlib import Path

import pytest

from mmlib import bootstrap

pytestmark = pytest.mark.slow


def cpu_torch_wheel() -> Path | None:
    """The CPU torch wheel this machine's pip is configured to find (its find-links), for this Python."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in bootstrap.pip_find_links(Path(sys.executable)) + ["/opt/wheels"]:
        found = sorted(Path(folder).glob(f"torch-*+cpu-{tag}-*.whl")) if Path(folder).is_dir() else []
        if found:
            return found[-1]
    return None


class Recorder(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        self.server.seen.append(f"{self.command} {self.path}")


@pytest.fixture(scope="module")
def torch_index(tmp_path_factory):
    """A PEP 503 index on 127.0.0.1 holding only the CPU torch wheel; .seen lists the requests."""
    wheel = cpu_torch_wheel()
    if wheel is None:
        pytest.skip("no CPU torch wheel in this machine's pip find-links")
    root = tmp_path_factory.mktemp("index")
    (root / "files").mkdir()
    (root / "files" / wheel.name).symlink_to(wheel)
    (root / "simple" / "torch").mkdir(parents=True)
    (root / "simple" / "torch" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../files/{wheel.name}">{wheel.name}</a></body></html>\n')
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Recorder, directory=str(root)))
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_port}/simple"
    server.wheel = wheel
    yield server
    server.shutdown()


@pytest.fixture
def no_machine_config(tmp_path, monkeypatch):
    """pip and uv as on a machine that never heard of the local wheel folder."""
    for name in list(os.environ):
        if name.startswith(("PIP_", "UV_")) and name != "PIP_CERT":
            monkeypatch.delenv(name)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip then reads no configuration file at all
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(empty))
    monkeypatch.setenv("UV_NO_CONFIG", "1")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))  # torch must come over the wire
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_torch_comes_from_the_index_mm_names(installer, torch_index, no_machine_config, tmp_path, monkeypatch):
    python = tmp_path / "venv" / "bin" / "python"
    venv.EnvBuilder(with_pip=True).create(python.parent.parent)
    assert bootstrap.pip_find_links(python) == [], "the machine's pip configuration is still in reach"
    monkeypatch.setenv("MM_TORCH_INDEX", torch_index.url)
    monkeypatch.setenv("MM_INSTALLER", installer)
    version = torch_index.wheel.name.split("-")[1]
    torch_index.seen.clear()

    no_bytecode = ["--no-compile"] if installer == "pip" else []  # pip compiles all of torch otherwise

    used = bootstrap.install(python, "cpu", ["--no-deps", *no_bytecode, f"torch=={version}"])

    assert used == installer
    assert f"GET /files/{torch_index.wheel.name}" in [s.replace("%2B", "+") for s in torch_index.seen]
    assert bootstrap.installed_versions(python, ("torch",)) == {"torch": version}
