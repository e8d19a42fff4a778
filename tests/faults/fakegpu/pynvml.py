"""A fake pynvml (nvidia-ml-py): one 80 GiB card whose compute processes are fake_gpu_state's."""
from __future__ import annotations

from types import SimpleNamespace

import fake_gpu_state as gpu

HANDLE = "fake-gpu-0"


def nvmlInit() -> None:
    pass


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return 1


def nvmlDeviceGetHandleByIndex(i: int) -> str:
    return HANDLE


def nvmlDeviceGetUUID(h) -> str:
    return "GPU-fake-0000"


def nvmlDeviceGetName(h) -> str:
    return "NVIDIA Fake H100"


def nvmlDeviceGetCudaComputeCapability(h) -> tuple[int, int]:
    return (9, 0)


def nvmlDeviceGetMemoryInfo(h) -> SimpleNamespace:
    used = sum(gpu.processes().values())
    return SimpleNamespace(total=gpu.TOTAL, used=used, free=gpu.TOTAL - used)


def nvmlDeviceGetComputeRunningProcesses(h) -> list[SimpleNamespace]:
    return [SimpleNamespace(pid=pid, usedGpuMemory=n) for pid, n in gpu.processes().items()]


def nvmlDeviceGetGraphicsRunningProcesses(h) -> list:
    return []


def nvmlSystemGetDriverVersion() -> str:
    return "580.159.04"


def nvmlSystemGetCudaDriverVersion_v2() -> int:
    return 13000
