"""What NVIDIA GPUs this machine has, through NVML (pynvml, from nvidia-ml-py): name, compute
capability, total and free memory, and which processes hold it. No CUDA, no torch: it answers in
milliseconds, and without a driver it says why instead of raising.

`probe(nvml)` takes the NVML module as an argument so tests hand in a fake one (a Hopper card, a
full card) instead of needing a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1 << 30


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


def _process_name(pid: int) -> str:
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:  # gone, or in another PID namespace
        return "?"


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    found: dict[int, GpuProcess] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nvml, getter)(handle)
        except Exception:
            continue
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            found.setdefault(p.pid, GpuProcess(p.pid, _process_name(p.pid), used if isinstance(used, int) else None))
    return tuple(found.values())


def _device(nvml: Any, index: int, with_processes: bool) -> GpuInfo:
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    try:
        cc: tuple[int, int] | None = tuple(nvml.nvmlDeviceGetCudaComputeCapability(h))  # type: ignore[assignment]
    except Exception:
        cc = None
    return GpuInfo(index=index, name=_text(nvml.nvmlDeviceGetName(h)), total=int(mem.total), free=int(mem.free),
                   compute_capability=cc, processes=_processes(nvml, h) if with_processes else ())


def probe(nvml: Any = None, with_processes: bool = True) -> GpuReport:
    """Every GPU NVML sees; GpuReport(gpus=None, error=why) where none answers."""
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py
        except ImportError:
            return GpuReport(None, error="pynvml (nvidia-ml-py) is not installed")
    try:
        nvml.nvmlInit()
    except Exception as e:  # no library, no driver, driver/library mismatch
        return GpuReport(None, error=f"NVML: {_text(e) or type(e).__name__}")
    try:
        gpus = tuple(_device(nvml, i, with_processes) for i in range(nvml.nvmlDeviceGetCount()))
        driver = cuda = None
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            v = int(nvml.nvmlSystemGetCudaDriverVersion_v2())
            cuda = f"{v // 1000}.{v % 1000 // 10}"
        except Exception:
            pass
        if not gpus:
            return GpuReport(None, driver, cuda, error="the NVIDIA driver answers but sees no GPU")
        return GpuReport(gpus, driver, cuda)
    except Exception as e:
        return GpuReport(None, error=f"NVML: {_text(e) or type(e).__name__}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def gpu_info(nvml: Any = None) -> list[GpuInfo] | None:
    """The GPUs, or None where no NVIDIA GPU answers."""
    report = probe(nvml, with_processes=False)
    return list(report.gpus) if report.gpus is not None else None
