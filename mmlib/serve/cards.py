"""Which cards a server runs on, on a machine of several GPUs: those its profile names (gpus = [0, 1]),
else its number of cards, the least used first. Servers on cards of their own never compete for room;
where their cards overlap the scheduler's memory rules hold on each card they share.

Cards are NVML's indices (what `mm status` prints and the server's CUDA_VISIBLE_DEVICES names, in
NVML's order). Without a GPU no card is known (None) and every server counts against the one budget,
as before.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from mmlib.profiles.profile import Profile


def place(profile: Profile, visible: list[int], load: Mapping[int, int]) -> tuple[int, ...] | None:
    """The cards a start of `profile` gets: the ones it names; else as many as it asks for, those the
    other servers hold least on first (`load`: bytes on each), then by index. None where no card is
    known (no GPU)."""
    if profile.gpu_indices:
        return profile.gpu_indices
    if not visible:
        return None
    ranked = sorted(visible, key=lambda c: (load.get(c, 0), visible.index(c)))
    return tuple(sorted(ranked[:profile.gpus]))


def share(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> bool:
    """Whether two servers compete for room: their cards overlap (unknown cards: they do)."""
    return a is None or b is None or bool(set(a) & set(b))


def judged(card_sets: Iterable[tuple[int, ...] | None]) -> list[int | None]:
    """The cards whose room to judge for these servers; [None] (one budget for all) where any
    server's cards are unknown."""
    found: set[int] = set()
    for cards in card_sets:
        if cards is None:
            return [None]
        found |= set(cards)
    return sorted(found) or [None]


def on(card: int | None, cards: tuple[int, ...] | None) -> bool:
    """Whether a server of `cards` holds memory on `card` (None: the one budget, everyone)."""
    return card is None or cards is None or card in cards


def status(devices: list[Any], servers: list[dict[str, Any]], budget: int | None) -> list[dict[str, Any]]:
    """Each card for `mm status` and the page: its memory (bytes; capacity is what mm may fill) and
    the servers on it with what each holds there (MiB, measured by NVML; None: placed there, holding
    nothing NVML shows yet), from the daemon's server snapshots."""
    out = []
    for gpu in devices:
        key, on = str(gpu.index), []
        for s in servers:
            mib = ((s.get("memory") or {}).get("cards") or {}).get(key)
            if mib is not None or gpu.index in (s.get("gpus") or ()) and s.get("pid"):
                on.append({"profile": s["profile"], "state": s["state"], "gpu_mib": mib})
        out.append({"index": gpu.index, "name": gpu.name, "total": gpu.total, "free": gpu.free, "used": gpu.used,
                    "capacity": min(budget, gpu.total) if budget else gpu.total, "servers": on})
    return out
