"""The one NVML wrapper (pynvml, from nvidia-ml-py): which NVIDIA GPUs this machine has (name,
compute capability, total and free memory, who holds it) and how much memory given processes hold.

No CUDA, no torch: it answers in milliseconds, and without a driver it says why instead of raising.
It sees the GPUs vLLM will see: NVML lists every device, so CUDA_VISIBLE_DEVICES (indices, or
GPU UUIDs as `nvidia-smi -L` prints them) narrows it to the same ones, in the same order: the first
is the card vLLM serves on and the one mm budgets. Indices are NVML's (PCI bus) order, which is
CUDA's order where the cards are alike or CUDA_DEVICE_ORDER=PCI_BUS_ID.
The NVML module is injectable (`Nvml(module)`, `probe(module)`) so tests hand in a fake one (a
Hopper card, a full card, two devices) instead of needing a GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

GIB = 1 << 30
MIB = 1 << 20
# The device shows compute processes but none of the asked ones: another PID namespace (a container),
# or NVML_VALUE_NOT_AVAILABLE (some hypervisors). Never reported as zero.
NOT_VISIBLE = "not visible"


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    used: int | None  # bytes; None where NVML cannot tell (some containers and hypervisors)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total: int  # bytes
    free: int
    compute_capability: tuple[int, int] | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def used(self) -> int:
        return self.total - self.free

    @property
    def is_hopper(self) -> bool:
        """sm_90 (H100, H200, GH200): where vLLM's FlashAttention 3 runs."""
        return bool(self.compute_capability and self.compute_capability[0] == 9)


@dataclass(frozen=True)
class GpuReport:
    gpus: tuple[GpuInfo, ...] | None  # None: no NVIDIA GPU answered (see error)
    driver: str | None = None
    cuda: str | None = None  # the newest CUDA the driver supports, e.g. "13.0"
    error: str | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_devices(count: int, uuid_of: Any, visible: str | None) -> list[int]:
    """NVML indices of the devices CUDA_VISIBLE_DEVICES leaves, in its order (CUDA's rules: an entry
    is an index or a UUID prefix, and the list ends at the first entry that names no device)."""
    if visible is None:
        return list(range(count))
    chosen: list[int] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit() and int(entry) < count:
            index = int(entry)
        elif entry.startswith("GPU-"):
            index = next((i for i in range(count) if _text(uuid_of(i)).startswith(entry)), -1)
        else:
            index = -1
        if index < 0 or index in chosen:
            break
        chosen.append(index)
    return chosen


def _process_name(pid: int) -> str:
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:  # gone, or in another PID namespace
        return "?"


class Nvml:
    """One NVML session. `available` is False without a library, a driver or a device (`error` says
    which). Long-lived users (the daemon, the 4 Hz sampler) keep one through `session()`."""

    def __init__(self, module: Any = None, visible: str | None = None) -> None:
        """visible: a CUDA_VISIBLE_DEVICES value; by default this process's own."""
        self.available, self.error = False, None
        self._nv: Any = None
        self._handles: list[Any] = []
        self._indices: list[int] = []  # NVML's index of each handle
        if visible is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if module is None:
            try:
                import pynvml as module  # nvidia-ml-py
            except ImportError:
                self.error = "pynvml (nvidia-ml-py) is not installed"
                return
        try:
            module.nvmlInit()
        except Exception as e:  # no library, no driver, driver/library mismatch
            self.error = f"NVML: {_text(e) or type(e).__name__}"
            return
        self._nv = module
        try:
            count = module.nvmlDeviceGetCount()
            self._indices = visible_devices(
                count, lambda i: module.nvmlDeviceGetUUID(module.nvmlDeviceGetHandleByIndex(i)), visible)
            self._handles = [module.nvmlDeviceGetHandleByIndex(i) for i in self._indices]
        except Exception as e:
            self.error = f"NVML: {_text(e) or type(e).__name__}"
            return
        self.available = bool(self._handles)
        if not self._handles:
            self.error = (f"CUDA_VISIBLE_DEVICES={visible!r} leaves none of this machine's {count} GPUs visible"
                          if count else "the NVIDIA driver answers but sees no GPU")

    def close(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:
                pass
            self._nv, self._handles, self.available = None, [], False

    # --- devices -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [_text(self._nv.nvmlDeviceGetName(h)) for h in self._handles]

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        found: dict[int, GpuProcess] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs = getattr(self._nv, getter)(handle)
            except Exception:
                continue
            for p in procs:
                used = getattr(p, "usedGpuMemory", None)
                found.setdefault(p.pid, GpuProcess(p.pid, _process_name(p.pid), used if isinstance(used, int) else None))
        return tuple(found.values())

    def device(self, position: int, with_processes: bool = True) -> GpuInfo:
        """The visible device at `position` (0: the one vLLM serves on), with NVML's index."""
        h, index = self._handles[position], self._indices[position]
        mem = self._nv.nvmlDeviceGetMemoryInfo(h)
        try:
            cc: tuple[int, int] | None = tuple(self._nv.nvmlDeviceGetCudaComputeCapability(h))  # type: ignore[assignment]
        except Exception:
            cc = None
        return GpuInfo(index=index, name=_text(self._nv.nvmlDeviceGetName(h)), total=int(mem.total),
                       free=int(mem.free), compute_capability=cc,
                       processes=self._processes(h) if with_processes else ())

    def report(self, with_processes: bool = True) -> GpuReport:
        if self._nv is None:
            return GpuReport(None, error=self.error)
        driver = cuda = None
        try:
            driver = _text(self._nv.nvmlSystemGetDriverVersion())
            v = int(self._nv.nvmlSystemGetCudaDriverVersion_v2())
            cuda = f"{v // 1000}.{v % 1000 // 10}"
        except Exception:
            pass
        if not self._handles:
            return GpuReport(None, driver, cuda, error=self.error)
        try:
            gpus = tuple(self.device(i, with_processes) for i in range(len(self._handles)))
        except Exception as e:
            return GpuReport(None, error=f"NVML: {_text(e) or type(e).__name__}")
        return GpuReport(gpus, driver, cuda)

    def indices(self) -> list[int]:
        """NVML's index of each visible device, in CUDA_VISIBLE_DEVICES' order."""
        return list(self._indices) if self.available else []

    def device_by_index(self, index: int, with_processes: bool = False) -> GpuInfo | None:
        """The visible device of NVML's `index`; None where it is not visible."""
        if not self.available or index not in self._indices:
            return None
        return self.device(self._indices.index(index), with_processes)

    def device_bytes(self) -> tuple[int, int] | None:
        """(used, total) over the visible devices."""
        if not self.available:
            return None
        used = total = 0
        for h in self._handles:
            info = self._nv.nvmlDeviceGetMemoryInfo(h)
            used, total = used + int(info.used), total + int(info.total)
        return used, total

    def compute_pids(self) -> set[int]:
        """The pids NVML lists as compute processes on the visible devices (a process the CUDA
        driver checkpointed leaves this list)."""
        found: set[int] = set()
        for h in self._handles if self.available else []:
            try:
                found.update(p.pid for p in self._nv.nvmlDeviceGetComputeRunningProcesses(h))
            except Exception:
                continue
        return found

    def processes_bytes(self, pids: set[int]) -> int | str | None:
        """GPU memory held by these processes; NOT_VISIBLE when NVML cannot attribute it to them;
        None without a GPU."""
        found = self.processes_bytes_by_device(pids)
        return sum(found.values()) if isinstance(found, dict) else found

    def processes_bytes_by_device(self, pids: set[int]) -> dict[int, int] | str | None:
        """GPU memory held by these processes on each visible device (NVML's index -> bytes, the
        devices they hold nothing on left out); NOT_VISIBLE when NVML cannot attribute it to them;
        None without a GPU."""
        if not self.available:
            return None
        mine: dict[int, int] = {}
        others, unknown = 0, False
        for h, index in zip(self._handles, self._indices):
            try:
                procs = self._nv.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:
                return NOT_VISIBLE
            for p in procs:
                if p.pid in pids:
                    if not isinstance(getattr(p, "usedGpuMemory", None), int):
                        unknown = True
                    else:
                        mine[index] = mine.get(index, 0) + p.usedGpuMemory
                else:
                    others += 1
        if unknown or (not sum(mine.values()) and others and pids):
            return NOT_VISIBLE
        return mine


@lru_cache(maxsize=1)
def session() -> Nvml:  # (CUDA_VISIBLE_DEVICES as it was at first use)
    """The process's long-lived NVML session (initialised once, on first use)."""
    return Nvml()


def probe(module: Any = None, with_processes: bool = True, visible: str | None = None) -> GpuReport:
    """Every visible GPU, once; GpuReport(gpus=None, error=why) where none answers."""
    nv = Nvml(module, visible)
    try:
        return nv.report(with_processes)
    finally:
        nv.close()


def gpu_info(module: Any = None) -> list[GpuInfo] | None:
    """The GPUs (without their processes), or None where no NVIDIA GPU answers."""
    report = probe(module, with_processes=False)
    return list(report.gpus) if report.gpus is not None else None


def gpu_name(nv: Nvml | None = None) -> str:
    """"NVIDIA H100 80GB HBM3", "2x NVIDIA H200", or "none"."""
    nv = nv or session()
    names = nv.names() if nv.available else []
    if len(names) <= 1:
        return names[0] if names else "none"
    return f"{len(names)}x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
