"""A fake pynvml (nvidia-ml-py): $FAKE_GPU_COUNT cards (default one) of 80 GiB whose compute processes
are fake_gpu_state's. A handle is the card's index."""
from __future__ import annotations

from types import SimpleNamespace

import fake_gpu_state as gpu



def nvmlInit() -> None:
    pass


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return gpu.count()


def nvmlDeviceGetHandleByIndex(i: int) -> int:
    if not 0 <= i < gpu.count():
        raise IndexError(f"no fake GPU {i}")
    return i


def nvmlDeviceGetUUID(h) -> str:
    return f"GPU-fake-{h:04d}"


def nvmlDeviceGetName(h) -> str:
    return "NVIDIA Fake H100"


def nvmlDeviceGetCudaComputeCapability(h) -> tuple[int, int]:
    return (9, 0)


def nvmlDeviceGetMemoryInfo(h) -> SimpleNamespace:
    used = sum(gpu.processes(h).values())
    return SimpleNamespace(total=gpu.TOTAL, used=used, free=gpu.TOTAL - used)


def nvmlDeviceGetComputeRunningProcesses(h) -> list[SimpleNamespace]:
    return [SimpleNamespace(pid=pid, usedGpuMemory=n) for pid, n in gpu.processes(h).items()]


def nvmlDeviceGetGraphicsRunningProcesses(h) -> list:
    return []


def nvmlSystemGetDriverVersion() -> str:
    return "580.159.04"


def nvmlSystemGetCudaDriverVersion_v2() -> int:
    return 13000
