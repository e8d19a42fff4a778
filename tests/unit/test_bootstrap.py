"""The install path: which index torch comes from, what uv and pip are told, when ./mm re-runs the
bootstrap (a GPU that came or went), and the Python floor the code keeps."""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import threading
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


# ---- one set-up at a time: the second bootstrap waits for the first, then finds it done ----

def test_a_second_bootstrap_waits_for_the_first_and_finds_it_done(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    installing, release, installs = threading.Event(), threading.Event(), []

    def install(python, flavor, packages):  # the first set-up holds the lock until the test releases it
        installs.append(flavor)
        installing.set()
        assert release.wait(10)
        return "uv"

    monkeypatch.setattr(bootstrap, "install", install)
    argv = ["--root", str(tmp_path), "--venv", str(venv), "--hash", "h1", "--flavor", "cuda"]
    first = threading.Thread(target=bootstrap.main, args=(argv,))
    first.start()
    assert installing.wait(10)
    second = threading.Thread(target=bootstrap.main, args=(argv,))
    second.start()
    release.set()
    first.join(10)
    second.join(10)
    assert installs == ["cuda"] and (venv / ".mm-stamp").read_text() == "h1 cuda"
    assert (tmp_path / "venv.lock").exists()  # the lock lives beside the venv, not in it


def test_the_lock_is_held_while_setting_up(tmp_path):
    venv = tmp_path / "venv"
    with bootstrap.setup_lock(venv):
        with open(tmp_path / "venv.lock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "venv.lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


def test_the_detector_asks_nvidia_smi_only(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MM_VLLM_FLAVOR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    executable(tmp_path / "nvidia-smi", "exit 9\n")  # Failed to initialize NVML: Driver/library version mismatch
    bootstrap.main(["--detect"])
    executable(tmp_path / "nvidia-smi", "exit 0\n")
    bootstrap.main(["--detect"])
    monkeypatch.setenv("MM_VLLM_FLAVOR", "cpu")
    bootstrap.main(["--detect"])
    assert capsys.readouterr().out.split() == ["cpu", "cuda", "cpu"]


# ---- the launcher: a fake venv python and a fake bootstrap (python3) record what ./mm ran ----

def executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def launcher(tmp_path):
    """./mm with a fake venv, a fake install (python3 writes the stamp for the hash it was given) and
    the real GPU detector (the bootstrap's --detect) asking a fake nvidia-smi (exits with the code in
    smi-rc; 9 = no GPU, or a driver/library mismatch) on a fake /dev and /proc (MM_SYSROOT)."""
    log = tmp_path / "log"
    venv, bin_, root = tmp_path / "venv", tmp_path / "bin", tmp_path / "sys"
    (venv / "bin").mkdir(parents=True)
    bin_.mkdir()
    (root / "proc" / "sys" / "kernel" / "random").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "proc" / "sys" / "kernel" / "random" / "boot_id").write_text("boot-1\n")
    (tmp_path / "smi-rc").write_text("9")
    executable(venv / "bin" / "python", f'echo "venv $*" >> {log}\n')
    executable(bin_ / "python3", f'case "$*" in *--detect*) exec {sys.executable} "$@";; esac\n'
               f'echo "bootstrap $*" >> {log}\n'
               'while [ $# -gt 0 ]; do case "$1" in --hash) h=$2;; --venv) v=$2;; --flavor) f=$2;; esac; shift; done\n'
               'echo "$h $f" > "$v/.mm-stamp"\n')
    executable(bin_ / "nvidia-smi", f'echo "nvidia-smi $*" >> {log}\nexit $(cat {tmp_path / "smi-rc"})\n')
    path = f"{bin_}:{os.path.dirname(shutil.which('bash'))}:/usr/bin:/bin"

    def run(*args: str, **env: str) -> list[str]:
        log.write_text("")
        full = {"PATH": path, "MM_VENV": str(venv), "MM_SYSROOT": str(root), **env}
        subprocess.run([str(ROOT / "mm"), *args], env=full, check=True)
        return log.read_text().splitlines()
    run.sysroot, run.smi_rc = root, tmp_path / "smi-rc"
    return run


def bootstraps(ran: list[str]) -> list[str]:
    """The --flavor each bootstrap in `ran` was given."""
    return [line.partition("--flavor ")[2].partition(" ")[0] or None for line in ran if line.startswith("bootstrap")]


def test_a_set_up_machine_runs_mm_without_the_bootstrap_or_a_gpu_query(launcher):
    first = launcher("status")
    assert first == ["nvidia-smi -L", first[1], "venv -m mmlib status"] and bootstraps(first) == ["cpu"]
    assert launcher("status") == ["venv -m mmlib status"]


def test_a_changed_gpu_signal_reruns_the_bootstrap_once(launcher):
    launcher("status")
    assert bootstraps(launcher("status", MM_VLLM_FLAVOR="cuda")) == ["cuda"]
    assert launcher("status", MM_VLLM_FLAVOR="cuda") == ["venv -m mmlib status"]
    assert bootstraps(launcher("status")) == ["cpu"]


def test_a_driver_mismatch_mended_by_a_reboot_installs_the_cuda_build(launcher):
    (launcher.sysroot / "dev" / "nvidia0").write_text("")  # the device node is there, nvidia-smi fails
    (launcher.sysroot / "proc" / "driver" / "nvidia").mkdir(parents=True)
    (launcher.sysroot / "proc" / "driver" / "nvidia" / "version").write_text("NVRM 570.1\n")
    first = launcher("status")
    assert launcher("status") == ["venv -m mmlib status"]  # asked once, not at every start
    launcher.smi_rc.write_text("0")  # the reboot: the new driver loads and answers
    (launcher.sysroot / "proc" / "sys" / "kernel" / "random" / "boot_id").write_text("boot-2\n")
    (launcher.sysroot / "proc" / "driver" / "nvidia" / "version").write_text("NVRM 575.2\n")
    ran = launcher("status")
    assert "nvidia-smi -L" in ran and bootstraps(ran) == ["cuda"]
    assert launcher("status") == ["venv -m mmlib status"]
    assert bootstraps(first) == ["cpu"]


def test_a_gpu_without_a_device_node_and_then_gone_goes_back_to_the_cpu_build(launcher):
    launcher.smi_rc.write_text("0")  # nvidia-smi answers, but there is no /dev/nvidia0 (a container's GPU 3)
    first = launcher("status")
    launcher.smi_rc.write_text("9")  # the card is gone after a reboot
    (launcher.sysroot / "proc" / "sys" / "kernel" / "random" / "boot_id").write_text("boot-2\n")
    assert bootstraps(launcher("status")) == ["cpu"]
    assert bootstraps(first) == ["cuda"]


def test_mm_test_adds_the_test_tools(launcher):
    launcher("status")
    ran = launcher("test", "-q")
    assert ran[0].startswith("bootstrap") and ran[0].endswith("--dev") and ran[1] == "venv -m pytest -q"


def test_mm_test_quick_runs_the_unit_and_fault_tests_on_parallel_workers(launcher):
    launcher("status")
    cores = os.cpu_count()
    parallel = f"venv -m pytest -n {cores} --dist loadgroup"
    assert launcher("test", "--quick", "-x")[-1] == \
        f"venv -m pytest -n {2 * cores} --dist loadgroup tests/unit tests/faults -x"
    assert launcher("test")[-1] == parallel  # the whole suite
    assert launcher("test", "--all", "-q")[-1] == f"{parallel} -q"
    assert launcher("test", "tests/unit/test_fit.py")[-1] == "venv -m pytest tests/unit/test_fit.py"
