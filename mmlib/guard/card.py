"""The card mm may use: NVML's total, or config.toml's gpu_budget below it (what guard.fit predicts on)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mmlib.profiles.memory import gib
from mmlib.system.nvml import GpuReport


@dataclass(frozen=True)
class Card:
    """The GPU as mm sees it."""
    capacity: int  # bytes mm may use: the card, or config.toml's gpu_budget below it
    total: int  # the device total vLLM reads; its --gpu-memory-utilization is a share of this
    name: str = "GPU"
    host_ram: int | None = None  # the machine's RAM, bytes (for KV offload); None: unknown

    @property
    def budgeted(self) -> bool:
        return self.capacity < self.total

    def label(self) -> str:
        if self.budgeted:
            return f"{gib(self.capacity)} of {self.name}"
        return self.name if gib(self.capacity) in self.name else f"{self.name} ({gib(self.capacity)})"

    def utilization(self, of_card: float) -> float:
        """vLLM's --gpu-memory-utilization for `of_card` of mm's card, rounded up to 0.001."""
        return min(1.0, math.ceil(of_card * self.capacity / self.total * 1000 - 1e-6) / 1000)


def host_ram() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # no psutil, or a sandbox that hides /proc/meminfo
        return None


def capped(total: int, budget: int | None) -> int:
    """Bytes mm may fill of a card of `total` bytes: config.toml's gpu_budget, never more than the card."""
    return min(budget, total) if budget else total


def card(config: Any, report: GpuReport | None, ram: int | None = None) -> Card | None:
    """The card mm may use: NVML's first GPU, capped by config.gpu_budget (a desktop's share of the
    card, or an emulated smaller one); the budget alone where no GPU answers; None with neither."""
    budget = getattr(config, "gpu_budget", None)
    gpu = report.gpus[0] if report and report.gpus else None
    if gpu is None and budget is None:
        return None
    total = gpu.total if gpu else budget
    return Card(capacity=capped(total, budget), total=total, name=gpu.name if gpu else "the GPU budget",
                host_ram=host_ram() if ram is None else ram)


def card_capacity(config: Any, report: GpuReport | None) -> int | None:
    """Bytes of GPU memory mm may use, given config.toml and an NVML report (the scheduler's budget)."""
    c = card(config, report, ram=0)
    return c.capacity if c else None


def sized_card(capacity: int, ram: int | None = None) -> Card:
    """A card of `capacity` bytes (`mm check --gpu-memory 12GiB`)."""
    return Card(capacity=capacity, total=capacity, name=f"a {gib(capacity)} card",
                host_ram=host_ram() if ram is None else ram)
