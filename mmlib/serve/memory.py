"""The card as the scheduler sees it: how many bytes mm may use (a budget from config.toml, else the
GPU's total), how much is free now, and what each server holds — measured over its process tree
through NVML once it runs, predicted before that.

The scheduler takes this as an injected object, so its memory decisions (co-residence, evicting
sleepers, waiting for memory to be released) are tested with a fake card (tests/unit/test_scheduler.py).
Without a GPU every answer is None and the scheduler falls back to declared shares.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mmlib.profiles.profile import Profile
from mmlib.system import proctree
from mmlib.system.nvml import GIB, Nvml, session

# Beside vLLM's budget (gpu_memory_utilization x total) a server holds its CUDA context and the CUDA
# graph pool: 0.5-0.9 GiB measured on the H100 (shared/gpu/README.md). A sleeping server keeps
# 0.86-1.7 GiB (context, graph pool, level-1 bookkeeping).
OUTSIDE_BUDGET = int(0.8 * GIB)
ASLEEP_DEFAULT = int(1.5 * GIB)


@dataclass
class Footprint:
    awake: int  # bytes while awake
    asleep: int  # bytes while asleep
    measured: bool = False


class CardMemory:
    """NVML-backed. `budget` (bytes) caps what mm uses of the card; `predict` may replace the
    share-based guess for a profile never seen running (mmlib.guard.fit's estimate)."""

    def __init__(self, budget: int | None = None, nvml: Nvml | None = None,
                 predict: Callable[[Profile, int], Footprint | None] | None = None):
        self.budget = budget
        self._nvml = nvml
        self._predict = predict

    @property
    def nvml(self) -> Nvml:
        return self._nvml or session()

    def _device(self):
        if not self.nvml.available:
            return None
        try:
            return self.nvml.device(0, with_processes=False)
        except Exception:
            return None

    def capacity(self) -> int | None:
        """Bytes mm may fill: the budget, never more than the card has."""
        gpu = self._device()
        if gpu is None:
            return None
        return min(self.budget, gpu.total) if self.budget else gpu.total

    def name(self) -> str | None:
        gpu = self._device()
        return gpu.name if gpu else None

    def free(self) -> int | None:
        """Bytes free on the card now (what vLLM checks when it starts). The budget is kept by the
        scheduler's fit decisions, not here: other programs' use is already out of this figure."""
        gpu = self._device()
        return None if gpu is None else gpu.free

    def held(self, pid: int | None) -> int | None:
        """Bytes the process tree of pid holds on the GPU; None where NVML cannot tell."""
        if not self.nvml.available:
            return None
        procs = proctree.family(pid)
        if not procs:
            return None
        got = self.nvml.processes_bytes({p.pid for p in procs})
        return got if isinstance(got, int) else None

    def predict(self, profile: Profile) -> Footprint | None:
        gpu = self._device()
        if gpu is None:
            return None
        if self._predict is not None:
            found = self._predict(profile, self.capacity() or gpu.total)
            if found is not None:
                return found
        share = float(profile.engine.get("gpu_memory_utilization", 0.9))
        return Footprint(awake=int(share * gpu.total) + OUTSIDE_BUDGET, asleep=ASLEEP_DEFAULT)


class NoCard:
    """No GPU (the CPU build): nothing is known, the scheduler uses declared shares."""
    budget = None

    def capacity(self) -> None:
        return None

    def free(self) -> None:
        return None

    def name(self) -> None:
        return None

    def held(self, pid: Any) -> None:
        return None

    def predict(self, profile: Profile) -> None:
        return None

