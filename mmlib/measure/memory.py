"""Memory of a server while a bench or eval runs: `MemorySampler` samples GPU (NVML) and RAM
(psutil) in a thread and keeps the series. Without a GPU (or its driver) the GPU figures read
NO_GPU instead of zeros. (`mm status` reads the same once, through mmlib.system.usage.)
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from mmlib.system import proctree
from mmlib.system.nvml import MIB, NOT_VISIBLE, Nvml, gpu_name, session
from mmlib.system.usage import NO_GPU

DEFAULT_INTERVAL_S = 0.25  # 4 Hz
__all__ = ["NO_GPU", "NOT_VISIBLE", "MemorySampler", "summarize", "gpu_name"]


def mib(value: int | str | None) -> float | str | None:
    return round(value / MIB, 1) if isinstance(value, int) else value


def ram_used_mib() -> float:
    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / MIB


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

    def __init__(self, pid: int | None, interval: float = DEFAULT_INTERVAL_S, probe: Nvml | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.pid, self.interval, self.clock = pid, interval, clock
        self.probe = probe or session()
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
            self._procs, self._procs_at = proctree.family(self.pid), self.now()
        return self._procs

    def sample_once(self) -> Sample:
        procs = self._tree()
        device = self.probe.device_bytes()
        gpu = self.probe.processes_bytes({p.pid for p in procs}) if procs else None
        s = Sample(t=round(self.now(), 3), gpu_server_mib=mib(gpu),
                   gpu_device_mib=mib(device[0]) if device else None, rss_mib=mib(proctree.rss_bytes(procs)),
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
        device = self.probe.device_bytes()
        doc = {"interval_s": self.interval, "started_at": self.started_at,
               "gpu": gpu_name(self.probe) if self.probe.available else NO_GPU,
               "gpu_total_mib": mib(device[1]) if device else NO_GPU,
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
