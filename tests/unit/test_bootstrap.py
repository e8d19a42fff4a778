"""The install path: which index torch comes from, what uv and pip are told, when ./mm re-runs the
bootstrap (a GPU that came or went), and the Python floor the code keeps."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mmlib import bootstrap

ROOT = Path(__file__).resolve().parents[2]
PY = Path("/venv/bin/python")


def reachable(url):
    return None


def sources(monkeypatch, flavor, index=None, probe=reachable, find_links=()):
    if index is None:
        monkeypatch.delenv("MM_TORCH_INDEX", raising=False)
    else:
        monkeypatch.setenv("MM_TORCH_INDEX", index)
    monkeypatch.setattr(bootstrap, "pip_find_links", lambda python: list(find_links))
    return bootstrap.torch_sources(flavor, PY, probe=probe)


def test_cpu_torch_comes_from_the_index_mm_names(monkeypatch):
    cmd = bootstrap.uv_command(Path("uv"), PY, sources(monkeypatch, "cpu"), ["-e", ".[cpu]"])
    assert cmd[cmd.index("--index") + 1] == "https://download.pytorch.org/whl/cpu"
    assert cmd[cmd.index("--index-strategy") + 1] == "unsafe-best-match"
    pip = bootstrap.pip_command(PY, sources(monkeypatch, "cpu"), ["-e", ".[cpu]"])
    assert pip[pip.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"


def test_mm_torch_index_names_a_mirror(monkeypatch):
    cmd = bootstrap.uv_command(Path("uv"), PY, sources(monkeypatch, "cpu", "http://mirror/simple"), [])
    assert cmd[cmd.index("--index") + 1] == "http://mirror/simple"
    assert "https://download.pytorch.org/whl/cpu" not in cmd


def test_cuda_lets_uv_pick_the_torch_build_for_the_driver(monkeypatch):
    cmd = bootstrap.uv_command(Path("uv"), PY, sources(monkeypatch, "cuda"), [])
    assert "--torch-backend=auto" in cmd and "--index" not in cmd
    mirrored = bootstrap.uv_command(Path("uv"), PY, sources(monkeypatch, "cuda", "http://mirror/cu129"), [])
    assert "--torch-backend=auto" not in mirrored and "http://mirror/cu129" in mirrored


def test_an_unreachable_index_falls_back_to_pips_find_links_and_says_so(monkeypatch, capsys):
    got = sources(monkeypatch, "cpu", probe=lambda url: "dns error", find_links=["/opt/wheels"])
    cmd = bootstrap.uv_command(Path("uv"), PY, got, [])
    assert "--index" not in cmd and cmd[cmd.index("--find-links") + 1] == "/opt/wheels"
    line = capsys.readouterr().err
    assert "cannot be reached (dns error)" in line and "/opt/wheels" in line


def test_an_unreachable_index_and_nothing_else_stops_with_the_fix(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        sources(monkeypatch, "cpu", probe=lambda url: "dns error")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MM_TORCH_INDEX" in err


def test_the_probe_tells_an_answering_server_from_none(tmp_path):
    assert bootstrap.unreachable(f"file://{tmp_path}") is None
    assert "does not exist" in bootstrap.unreachable(str(tmp_path / "nope"))
    assert bootstrap.unreachable("http://127.0.0.1:9/simple", timeout=2) is not None


def test_pip_find_links_are_read_from_pips_own_configuration(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nfind-links = /wheels/a /wheels/b\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_FIND_LINKS", "/wheels/env")
    assert bootstrap.pip_find_links(Path(sys.executable)) == ["/wheels/env", "/wheels/a", "/wheels/b"]


def test_a_flavor_change_is_said_in_one_line():
    assert bootstrap.flavor_change(None, "cpu") is None
    assert bootstrap.flavor_change("cpu", "cpu") is None
    assert "GPU answers now" in bootstrap.flavor_change("cpu", "cuda")
    assert "CPU build" in bootstrap.flavor_change("cuda", "cpu")


# ---- the launcher: a fake venv python and a fake bootstrap (python3) record what ./mm ran ----

def executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def launcher(tmp_path):
    log = tmp_path / "log"
    venv, bin_ = tmp_path / "venv", tmp_path / "bin"
    (venv / "bin").mkdir(parents=True)
    bin_.mkdir()
    executable(venv / "bin" / "python", f'echo "venv $*" >> {log}\n')
    # the bootstrap's part that matters here: it writes the stamp for the hash it was given
    executable(bin_ / "python3", f'echo "bootstrap $*" >> {log}\n'
               'while [ $# -gt 0 ]; do case "$1" in --hash) h=$2;; --venv) v=$2;; esac; shift; done\n'
               'echo "$h cpu" > "$v/.mm-stamp"\n')
    executable(bin_ / "nvidia-smi", f'echo "nvidia-smi $*" >> {log}\n')
    path = f"{bin_}:{os.path.dirname(shutil.which('bash'))}:/usr/bin:/bin"

    def run(*args: str, **env: str) -> list[str]:
        log.write_text("")
        full = {"PATH": path, "MM_VENV": str(venv), **env}
        subprocess.run([str(ROOT / "mm"), *args], env=full, check=True)
        return log.read_text().splitlines()
    return run


def test_a_set_up_machine_runs_mm_without_the_bootstrap_or_a_gpu_query(launcher):
    first = launcher("status")
    assert first[0].startswith("bootstrap") and first[1] == "venv -m mmlib status"
    assert launcher("status") == ["venv -m mmlib status"]


def test_a_changed_gpu_signal_reruns_the_bootstrap_once(launcher):
    launcher("status")
    assert launcher("status", MM_VLLM_FLAVOR="cuda")[0].startswith("bootstrap")
    assert launcher("status", MM_VLLM_FLAVOR="cuda") == ["venv -m mmlib status"]
    assert launcher("status")[0].startswith("bootstrap")


def test_mm_test_adds_the_test_tools(launcher):
    launcher("status")
    ran = launcher("test", "-q")
    assert ran[0].startswith("bootstrap") and ran[0].endswith("--dev") and ran[1] == "venv -m pytest -q"
