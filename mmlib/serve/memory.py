"""The card as the scheduler sees it: how many bytes mm may use (a budget from config.toml, else the
GPU's total), how much is free now, and what each server holds — measured over its process tree
through NVML once it runs, predicted before that.

On a machine of several cards every figure is one card's: the capacity of each (they are taken to be
alike: the first visible card's), the free bytes of the fullest of a server's cards, and what a
server holds on the card where it holds most (a tensor-parallel server holds its part on each, a
data-parallel one a replica on each).

The scheduler takes this as an injected object, so its memory decisions (co-residence, evicting
sleepers, waiting for memory to be released) are tested with a fake card (tests/unit/test_scheduler.py).
Without a GPU every answer is None and the scheduler falls back to declared shares.
"""
from __future__ import annotations

from typing import Any, Callable

from mmlib.guard import fit
from mmlib.guard.card import capped
from mmlib.guard.fit import Footprint
from mmlib.profiles.profile import Profile
from mmlib.system import proctree
from mmlib.system.nvml import Nvml, session


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

    def cards(self) -> list[int]:
        """NVML's index of each card mm may use (CUDA_VISIBLE_DEVICES' choice); [] without a GPU."""
        return self.nvml.indices() if self.nvml.available else []

    def devices(self) -> list[Any]:
        """Each card mm may use, as NVML sees it now (nvml.GpuInfo, without processes)."""
        if not self.nvml.available:
            return []
        try:
            return [self.nvml.device(i, with_processes=False) for i in range(len(self.nvml.indices()))]
        except Exception:
            return []

    def capacity(self) -> int | None:
        """Bytes mm may fill of a card: the budget, never more than the card has."""
        gpu = self._device()
        if gpu is None:
            return None
        return capped(gpu.total, self.budget)

    def name(self) -> str | None:
        gpu = self._device()
        return gpu.name if gpu else None

    def free(self, cards: tuple[int, ...] | None = None) -> int | None:
        """Bytes free now on the fullest of `cards` (default: the first card), what vLLM checks on
        each when it starts. The budget is kept by the scheduler's fit decisions, not here: other
        programs' use is already out of this figure."""
        if not cards:
            gpu = self._device()
            return None if gpu is None else gpu.free
        try:
            found = [self.nvml.device_by_index(c) for c in cards] if self.nvml.available else []
        except Exception:
            return None
        found = [g for g in found if g is not None]
        return min(g.free for g in found) if found else None

    def held(self, pid: int | None) -> int | None:
        """Bytes the process tree of pid holds on the card where it holds most (one card's
        footprint); None where NVML cannot tell."""
        if not self.nvml.available:
            return None
        procs = proctree.family(pid)
        if not procs:
            return None
        got = self.nvml.processes_bytes_by_device({p.pid for p in procs})
        return max(got.values(), default=0) if isinstance(got, dict) else None

    def predict(self, profile: Profile) -> Footprint | None:
        gpu = self._device()
        if gpu is None:
            return None
        if self._predict is not None:
            found = self._predict(profile, self.capacity() or gpu.total)
            if found is not None:
                return found
        # guard.fit's estimate without the model's shapes: its share of the card and what sleep keeps
        card = fit.Card(capacity=self.capacity() or gpu.total, total=gpu.total, name=gpu.name, host_ram=0)
        return fit.predict(profile, card).footprint


class NoCard:
    """No GPU (the CPU build): nothing is known, the scheduler uses declared shares."""
    budget = None

    def cards(self) -> list[int]:
        return []

    def devices(self) -> list[Any]:
        return []

    def capacity(self) -> None:
        return None

    def free(self, cards: Any = None) -> None:
        return None

    def name(self) -> None:
        return None

    def held(self, pid: Any) -> None:
        return None

    def predict(self, profile: Profile) -> None:
        return None

