"""Autostart (the systemd user unit, `mm service`, the doctor's line) and shell completion."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmlib.guard import doctor
from mmlib.system import systemd
from mmlib.system.systemd import ServiceState
from tests.conftest import ROOT, run_mm


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing (apt-get install -y systemd provides it)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    text = systemd.render_unit(sys.executable, ROOT, {"MM_HOME": str(tmp_path / "odd dir %h"), "MM_PROXY_PORT": "8000"},
                               tmp_path / "config" / "daemon.env")
    unit = tmp_path / "mm.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "mm.service" in line]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr
    # and the tool does catch a broken one
    unit.write_text(text.replace(f'ExecStart="{sys.executable}"', "ExecStart=relative/python"))
    assert subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True).returncode != 0


def test_the_unit_runs_the_venv_python_as_the_daemon_with_what_it_needs(tmp_path):
    text = systemd.render_unit("/opt/mm/.venv/bin/python", Path("/opt/mm"), systemd.passed_env(
        {"MM_HOME": "/data/mm", "HF_HOME": "/data/hf", "HOME": "/root", "HF_TOKEN": "secret"}), tmp_path / "daemon.env")
    assert 'ExecStart="/opt/mm/.venv/bin/python" -m mmlib daemon' in text
    assert "WorkingDirectory=/opt/mm" in text and "Restart=on-failure" in text and "WantedBy=default.target" in text
    assert 'Environment="MM_HOME=/data/mm"' in text and 'Environment="HF_HOME=/data/hf"' in text
    assert "secret" not in text  # secrets belong in the EnvironmentFile, not in a unit others may read
    assert f"EnvironmentFile=-{tmp_path / 'daemon.env'}" in text


@pytest.fixture
def fake_systemctl(tmp_path) -> tuple[dict, Path]:
    """A systemctl on PATH that records its arguments (the real one needs a user session)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "MM_HOME": str(tmp_path / "home"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, calls


def test_service_install_writes_enables_and_remove_undoes(fake_systemctl, tmp_path):
    env, calls = fake_systemctl
    unit = tmp_path / "xdg" / "systemd" / "user" / "mm.service"
    out = run_mm("service", "install", env=env)
    assert unit.is_file() and f'ExecStart="{sys.executable}" -m mmlib daemon' in unit.read_text()
    assert "enabled and started" in out.stdout
    assert calls.read_text().splitlines() == ["--user daemon-reload", "--user enable --now mm.service"]
    calls.unlink()
    run_mm("service", "remove", env=env)
    assert not unit.exists()
    assert calls.read_text().splitlines() == ["--user disable --now mm.service", "--user daemon-reload"]


def test_without_a_user_session_install_says_what_to_run(fake_systemctl, tmp_path):
    env, calls = fake_systemctl
    (Path(env["PATH"].split(os.pathsep)[0]) / "systemctl").write_text(
        "#!/bin/sh\necho 'Failed to connect to bus: No medium found' >&2\nexit 1\n")
    r = run_mm("service", "install", env=env)
    assert "Failed to connect to bus" in r.stderr
    assert "systemctl --user daemon-reload && systemctl --user enable --now mm.service" in r.stdout
    assert (tmp_path / "xdg" / "systemd" / "user" / "mm.service").is_file()


@pytest.mark.parametrize("state,status,words", [
    (ServiceState(False, "not installed", "unknown", Path("/u/mm.service")), "ok", "not installed"),
    (ServiceState(True, "enabled", "active", Path("/u/mm.service")), "ok", "enabled, active"),
    (ServiceState(True, "enabled", "failed", Path("/u/mm.service")), "warn", "enabled, failed"),
    (ServiceState(True, "disabled", "inactive", Path("/u/mm.service")), "warn", "disabled, inactive"),
    (ServiceState(True, "unknown", "unknown", Path("/u/mm.service"), "Failed to connect to bus"), "warn",
     "Failed to connect to bus"),
])
def test_doctor_says_whether_the_daemon_starts_at_login(state, status, words):
    line = doctor.service_line(lambda: state)
    assert line.what == "autostart" and line.status == status and words in line.detail


def test_completion_scripts_and_the_protocol_behind_them():
    assert "_MM_COMPLETE=bash_complete" in run_mm("completion", "bash").stdout
    assert "#compdef mm" in run_mm("completion", "zsh").stdout
    assert "complete --no-files --command mm" in run_mm("completion", "fish").stdout
    env = {"COMP_WORDS": "mm up def", "COMP_CWORD": "2", "_MM_COMPLETE": "bash_complete"}
    assert run_mm(env=env).stdout.strip() == "plain,default"
    env = {"COMP_WORDS": "mm pu", "COMP_CWORD": "1", "_MM_COMPLETE": "bash_complete"}
    assert run_mm(env=env).stdout.strip() == "plain,pull"
