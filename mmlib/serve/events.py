"""What happened lately, for the page's last-hour timeline: requests, switches and state changes.

Two bounded rings, so that a flood of requests never pushes out the switches and state changes the
timeline draws its bands from. Every event gets a sequence number; a reader asks for what came
after the last one it saw and waits on `changed` for more (one event loop: no locking).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import Any, Callable

REQUESTS_KEPT = 5000   # ~1.4 requests/s for an hour; a busier hour keeps its newest 5000
CHANGES_KEPT = 1000    # switches and state changes
WINDOW_S = 3600.0


class EventLog:
    def __init__(self, clock: Callable[[], float] = time.time, requests_kept: int = REQUESTS_KEPT,
                 changes_kept: int = CHANGES_KEPT):
        self.clock = clock
        self._requests: deque[dict[str, Any]] = deque(maxlen=requests_kept)
        self._changes: deque[dict[str, Any]] = deque(maxlen=changes_kept)
        self._seq = itertools.count(1)
        self.last_seq = 0
        self._waiters: set[asyncio.Event] = set()

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"seq": next(self._seq), "t": self.clock(), "kind": kind, **fields}
        self.last_seq = event["seq"]
        (self._requests if kind == "request" else self._changes).append(event)
        for waiter in self._waiters:
            waiter.set()
        return event

    def after(self, seq: int = 0, window_s: float = WINDOW_S) -> list[dict[str, Any]]:
        """Events newer than seq and inside the window, oldest first."""
        since = self.clock() - window_s
        found = []
        for ring in (self._requests, self._changes):  # each ring is in order: read back from the newest
            for event in reversed(ring):
                if event["seq"] <= seq or event["t"] < since:
                    break
                found.append(event)
        return sorted(found, key=lambda e: e["seq"])

    def waiter(self) -> asyncio.Event:
        """An event set whenever something is added; forget() it when done."""
        w = asyncio.Event()
        self._waiters.add(w)
        return w

    def forget(self, waiter: asyncio.Event) -> None:
        self._waiters.discard(waiter)

