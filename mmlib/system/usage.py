"""What one process tree holds now: GPU memory through NVML, RAM through psutil (for `mm status`,
the scheduler's footprints and the bench/eval sampler); and the machine's RAM (the scheduler's RAM
budget for sleepers)."""
from __future__ import annotations

from typing import Any

import psutil

from mmlib.system import proctree
from mmlib.system.nvml import MIB, Nvml, session

NO_GPU = "no GPU"


def tree_memory(pid: int | None, nv: Nvml | None = None) -> dict[str, Any]:
    """{"gpu_mib": MiB | None, "rss_mib": MiB | None, "ram_mib": MiB | None, "gpu": note | None,
    "cards": {index: MiB}} for pid's whole tree. ram_mib is its share of RAM (PSS; what `mm status`
    shows), rss_mib the sum of its processes' RSS (which counts the libraries they share once per
    process); "cards": what it holds on each card, by NVML's index as a string.

    gpu_mib is None without a GPU ("gpu": "no GPU") or where NVML cannot attribute memory to the
    tree's processes ("gpu": "not visible")."""
    if not pid:
        return {"gpu_mib": None, "rss_mib": None, "ram_mib": None, "gpu": None, "cards": {}}
    procs = proctree.family(pid)
    nv = nv or session()
    found = nv.processes_bytes_by_device({p.pid for p in procs}) if nv.available and procs else None
    note = NO_GPU if not nv.available else (found if isinstance(found, str) else None)
    cards = found if isinstance(found, dict) else {}
    rss, pss = proctree.rss_bytes(procs), proctree.pss_bytes(procs)
    return {"gpu_mib": round(sum(cards.values()) / MIB, 1) if isinstance(found, dict) else None,
            "rss_mib": None if rss is None else round(rss / MIB, 1),
            "ram_mib": None if pss is None else round(pss / MIB, 1), "gpu": note,
            "cards": {str(i): round(n / MIB, 1) for i, n in sorted(cards.items())}}


def host_ram() -> tuple[int, int]:
    """(total, available) bytes of the machine's RAM; available as the kernel counts it (free plus
    what it can reclaim without swapping)."""
    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)
