"""Memory sampling: NVML faked through a stand-in pynvml module, RAM read for real."""
from __future__ import annotations

import os
import sys
import time
import types

import pytest

from mmlib.measure import memory
from mmlib.measure.memory import MemorySampler
from mmlib.system.nvml import NOT_VISIBLE, Nvml, gpu_name
from mmlib.system.usage import NO_GPU, tree_memory

MIB = 1024 * 1024


def fake_pynvml(devices: list[dict], fail_init: bool = False) -> types.ModuleType:
    """A pynvml with `devices`: each {"name", "used", "total" (MiB), "procs": [(pid, MiB or None)]}."""
    m = types.ModuleType("pynvml")

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
    m.nvmlInit = init
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    m.nvmlDeviceGetName = lambda h: h["name"].encode()
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=h["used"] * MIB, total=h["total"] * MIB)
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=None if mib is None else mib * MIB) for pid, mib in h["procs"]]
    return m


def probe_with(monkeypatch, devices, fail_init=False) -> Nvml:
    return Nvml(fake_pynvml(devices, fail_init))


class FakeProbe:
    """An Nvml stand-in whose figures are set in MiB."""

    def __init__(self, available=True, device=(1000.0, 8000.0), server=500.0):
        self.available, self.device, self.server = available, device, server

    def names(self):
        return ["Fake GPU"] if self.available else []

    def device_bytes(self):
        return tuple(int(v * MIB) for v in self.device) if self.available else None

    def processes_bytes(self, pids):
        return int(self.server * MIB) if self.available else None

    def processes_bytes_by_device(self, pids):
        return {0: int(self.server * MIB)} if self.available else None


def test_probe_attributes_memory_to_the_server_processes(monkeypatch):
    probe = probe_with(monkeypatch, [{"name": "NVIDIA H100", "used": 9000, "total": 81559,
                                      "procs": [(11, 6000), (12, 2000), (99, 1000)]}])
    assert probe.available and probe.names() == ["NVIDIA H100"]
    assert probe.device_bytes() == (9000 * MIB, 81559 * MIB)
    assert probe.processes_bytes({11, 12}) == 8000 * MIB
    assert gpu_name(probe) == "NVIDIA H100"


def test_probe_sums_devices_and_names_them(monkeypatch):
    dev = {"name": "NVIDIA H200", "used": 100, "total": 1000, "procs": [(5, 60)]}
    probe = probe_with(monkeypatch, [dev, dict(dev, procs=[(6, 40)])])
    assert probe.device_bytes() == (200 * MIB, 2000 * MIB)
    assert probe.processes_bytes({5, 6}) == 100 * MIB
    assert gpu_name(probe) == "2x NVIDIA H200"


def test_probe_says_not_visible_rather_than_zero(monkeypatch):
    # Processes on the card but none of ours: another PID namespace, so the figure is unknown.
    probe = probe_with(monkeypatch, [{"name": "g", "used": 5000, "total": 8000, "procs": [(4242, 4000)]}])
    assert probe.processes_bytes({1, 2}) == NOT_VISIBLE
    probe = probe_with(monkeypatch, [{"name": "g", "used": 5000, "total": 8000, "procs": [(1, None)]}])
    assert probe.processes_bytes({1}) == NOT_VISIBLE


def test_no_gpu_without_nvml(monkeypatch):
    probe = probe_with(monkeypatch, [], fail_init=True)
    assert not probe.available and probe.device_bytes() is None and probe.processes_bytes({1}) is None
    assert gpu_name(probe) == "none"


def test_tree_memory_reads_this_process_tree():
    out = tree_memory(os.getpid(), nv=FakeProbe(available=False))
    assert out["gpu_mib"] is None and out["gpu"] == NO_GPU
    assert out["rss_mib"] > 1
    with_gpu = tree_memory(os.getpid(), nv=FakeProbe(server=1234.5))
    assert with_gpu == {"gpu_mib": 1234.5, "rss_mib": pytest.approx(out["rss_mib"], rel=0.5),
                        "ram_mib": pytest.approx(out["ram_mib"], rel=0.5), "gpu": None, "cards": {"0": 1234.5}}
    assert 0 < out["ram_mib"] <= out["rss_mib"] * 1.1  # this process's PSS share
    assert tree_memory(None)["rss_mib"] is None and tree_memory(None)["ram_mib"] is None


def test_tree_memory_is_cheap():
    tree_memory(os.getpid())  # the first call initialises NVML (or finds none)
    t0 = time.perf_counter()
    for _ in range(10):
        tree_memory(os.getpid())
    assert (time.perf_counter() - t0) / 10 < 0.05


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_sampler_peaks_means_and_series():
    clock, probe = Clock(), FakeProbe()
    s = MemorySampler(os.getpid(), probe=probe, clock=clock)
    for t, used, server in ((0.0, 1000.0, 500.0), (0.5, 3000.0, 2500.0), (1.0, 2000.0, 1500.0)):
        clock.t, probe.device, probe.server = 100.0 + t, (used, 8000.0), server
        s.sample_once()
    doc = s.result()
    assert doc["gpu"] == "Fake GPU" and doc["gpu_total_mib"] == 8000.0
    assert doc["peak"]["gpu_server_mib"] == 2500.0 and doc["mean"]["gpu_server_mib"] == 1500.0
    assert doc["peak"]["gpu_device_mib"] == 3000.0
    assert doc["peak"]["rss_mib"] > 1 and doc["peak"]["ram_used_mib"] > 1
    assert doc["series"]["t"] == [0.0, 0.5, 1.0]
    assert doc["series"]["gpu_server_mib"] == [500.0, 2500.0, 1500.0]
    window = s.stats(0.4, 1.0)
    assert window["samples"] == 2 and window["peak"]["gpu_server_mib"] == 2500.0


def test_sampler_without_gpu_says_so_instead_of_zeros():
    s = MemorySampler(os.getpid(), probe=FakeProbe(available=False))
    s.sample_once()
    doc = s.result()
    assert doc["gpu"] == NO_GPU and doc["gpu_total_mib"] == NO_GPU
    assert doc["peak"]["gpu_server_mib"] == NO_GPU and doc["mean"]["gpu_device_mib"] == NO_GPU
    assert doc["series"]["gpu_server_mib"] == NO_GPU
    assert isinstance(doc["peak"]["rss_mib"], float)


def test_sampler_thread_samples_at_least_twice_a_second():
    assert memory.DEFAULT_INTERVAL_S <= 0.5
    with MemorySampler(os.getpid(), interval=0.02, probe=FakeProbe()) as s:
        time.sleep(0.3)
    n = len(s.samples)
    assert n >= 5
    time.sleep(0.1)
    assert len(s.samples) == n  # stopped


def test_sampler_survives_a_dead_server():
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    s = MemorySampler(proc.pid, probe=FakeProbe(available=False))
    sample = s.sample_once()
    assert sample.rss_mib is None and sample.ram_used_mib > 0
    assert s.result()["peak"]["rss_mib"] is None
