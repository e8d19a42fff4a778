"""Memory of a server while it works: GPU through NVML, RAM through psutil.

`server_memory(pid)` is the cheap one-off read for `mm status`; `MemorySampler` samples in a thread
while a bench or eval runs and keeps the series. pynvml is imported lazily and initialised once per
process; without a GPU (or its driver) the GPU figures read NO_GPU instead of zeros.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable

import psutil

MIB = 1024 * 1024
NO_GPU = "no GPU"
# The device shows compute processes but none of the server's: another PID namespace (a container).
NOT_VISIBLE = "not visible"
DEFAULT_INTERVAL_S = 0.25  # 4 Hz


class GpuProbe:
    """Device and per-process GPU memory through NVML; `available` is False without a GPU."""

    def __init__(self) -> None:
        self.available = False
        self._nv: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nv = pynvml
            self.available = bool(self._handles)
        except Exception:  # no library, no driver, no device: all mean "no GPU"
            self._handles = []

    def names(self) -> list[str]:
        out = []
        for h in self._handles:
            name = self._nv.nvmlDeviceGetName(h)
            out.append(name.decode() if isinstance(name, bytes) else str(name))
        return out

    def device_mib(self) -> tuple[float, float] | None:
        """(used, total) over all devices."""
        if not self.available:
            return None
        used = total = 0
        for h in self._handles:
            info = self._nv.nvmlDeviceGetMemoryInfo(h)
            used, total = used + info.used, total + info.total
        return used / MIB, total / MIB

    def processes_mib(self, pids: set[int]) -> float | str | None:
        """GPU memory held by these processes; NOT_VISIBLE when NVML cannot attribute it to them."""
        if not self.available:
            return None
        mine, others, unknown = 0.0, 0, False
        for h in self._handles:
            try:
                procs = self._nv.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:
                return NOT_VISIBLE
            for p in procs:
                if p.pid in pids:
                    if p.usedGpuMemory is None:  # NVML_VALUE_NOT_AVAILABLE (e.g. under some hypervisors)
                        unknown = True
                    else:
                        mine += p.usedGpuMemory / MIB
                else:
                    others += 1
        if unknown or (mine == 0 and others and pids):
            return NOT_VISIBLE
        return mine


@lru_cache(maxsize=1)
def gpu_probe() -> GpuProbe:
    return GpuProbe()


def gpu_name(probe: GpuProbe | None = None) -> str:
    """"NVIDIA H100 80GB HBM3", "2x NVIDIA H200", or "none"."""
    probe = probe or gpu_probe()
    names = probe.names() if probe.available else []
    if len(names) <= 1:
        return names[0] if names else "none"
    return f"{len(names)}x {names[0]}" if len(set(names)) == 1 else ", ".join(names)


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss_mib(procs: Iterable[psutil.Process]) -> float | None:
    total, seen = 0, False
    for p in procs:
        try:
            total += p.memory_info().rss
            seen = True
        except psutil.Error:
            continue
    return total / MIB if seen else None


def ram_used_mib() -> float:
    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / MIB


def server_memory(pid: int | None, probe: GpuProbe | None = None) -> dict[str, Any]:
    """What one server holds now: {"gpu_mib": MiB | None, "rss_mib": MiB | None, "gpu": note | None}.

    gpu_mib is None without a GPU ("gpu": "no GPU") or where NVML cannot attribute memory to the
    server's processes ("gpu": "not visible"). rss_mib sums the server's whole process tree."""
    if not pid:
        return {"gpu_mib": None, "rss_mib": None, "gpu": None}
    procs = process_tree(pid)
    probe = probe or gpu_probe()
    gpu = probe.processes_mib({p.pid for p in procs}) if probe.available and procs else None
    note = NO_GPU if not probe.available else (gpu if isinstance(gpu, str) else None)
    return {"gpu_mib": None if isinstance(gpu, str) else _round(gpu), "rss_mib": _round(rss_mib(procs)),
            "gpu": note}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    gpu_server_mib: float | str | None
    gpu_device_mib: float | None
    rss_mib: float | None
    ram_used_mib: float


SERIES_KEYS = ("gpu_server_mib", "gpu_device_mib", "rss_mib", "ram_used_mib")


class MemorySampler:
    """Samples a server's memory in a background thread (4 Hz by default) until stopped.

    The probe and the clock are injected so tests run it without a GPU or real time."""

    def __init__(self, pid: int | None, interval: float = DEFAULT_INTERVAL_S, probe: GpuProbe | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.pid, self.interval, self.clock = pid, interval, clock
        self.probe = probe or gpu_probe()
        self.samples: list[Sample] = []
        self.started_at = time.time()
        self._t0 = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: list[psutil.Process] = []
        self._procs_at = -1e9

    def now(self) -> float:
        return self.clock() - self._t0

    def _tree(self) -> list[psutil.Process]:
        # vLLM's process tree settles once the server is up; re-reading it every second is plenty.
        if self.pid and self.now() - self._procs_at >= 1.0:
            self._procs, self._procs_at = process_tree(self.pid), self.now()
        return self._procs

    def sample_once(self) -> Sample:
        procs = self._tree()
        device = self.probe.device_mib()
        gpu = self.probe.processes_mib({p.pid for p in procs}) if procs else None
        s = Sample(t=round(self.now(), 3), gpu_server_mib=gpu if isinstance(gpu, str) else _round(gpu),
                   gpu_device_mib=_round(device[0]) if device else None, rss_mib=_round(rss_mib(procs)),
                   ram_used_mib=round(ram_used_mib(), 1))
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.sample_once()
            except Exception:  # a sample lost is no reason to stop a benchmark
                pass
            self._stop.wait(max(0.0, self.interval - (self.clock() - started)))

    def start(self) -> "MemorySampler":
        self._thread = threading.Thread(target=self._run, name="mm-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- figures -----------------------------------------------------------------------------------
    def stats(self, t0: float | None = None, t1: float | None = None) -> dict[str, Any]:
        """Peaks and means of the samples between t0 and t1 (seconds since start; all by default)."""
        picked = [s for s in list(self.samples) if (t0 is None or s.t >= t0) and (t1 is None or s.t <= t1)]
        return summarize(picked, self.probe.available)

    def result(self) -> dict[str, Any]:
        """Everything a result file keeps: totals, peaks, means and the series for a plot."""
        samples = list(self.samples)
        device = self.probe.device_mib()
        doc = {"interval_s": self.interval, "started_at": self.started_at,
               "gpu": gpu_name(self.probe) if self.probe.available else NO_GPU,
               "gpu_total_mib": _round(device[1]) if device else NO_GPU,
               "ram_total_mib": round(psutil.virtual_memory().total / MIB, 1),
               **summarize(samples, self.probe.available)}
        doc["series"] = {"t": [s.t for s in samples],
                         **{k: [getattr(s, k) for s in samples] for k in SERIES_KEYS}}
        if not self.probe.available:
            doc["series"]["gpu_server_mib"] = doc["series"]["gpu_device_mib"] = NO_GPU
        return doc


def summarize(samples: list[Sample], gpu_available: bool) -> dict[str, Any]:
    peak: dict[str, Any] = {}
    mean: dict[str, Any] = {}
    for key in SERIES_KEYS:
        if key.startswith("gpu") and not gpu_available:
            peak[key] = mean[key] = NO_GPU
            continue
        values = [getattr(s, key) for s in samples]
        numbers = [v for v in values if isinstance(v, (int, float))]
        if numbers:
            peak[key], mean[key] = round(max(numbers), 1), round(sum(numbers) / len(numbers), 1)
        else:
            note = next((v for v in values if isinstance(v, str)), None)
            peak[key] = mean[key] = note
    return {"samples": len(samples), "peak": peak, "mean": mean}
