"""A clock the test moves: now() is virtual seconds, sleep() waits until the test advances past it.
Injected where the code takes a clock (mmlib.system.clock.Clock), so time-driven logic (hold-offs,
backoffs, drains, idle duties) runs deterministically in milliseconds."""
from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any, Awaitable

SETTLE_ROUNDS = 50


async def settle(rounds: int = SETTLE_ROUNDS) -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.t = start
        self._timers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.t + seconds, next(self._seq), fut))
        await fut

    def _fire_next(self, until: float | None = None) -> bool:
        """Move to the next live timer (not past `until`) and fire it; False where there is none."""
        while self._timers:
            when, _, fut = self._timers[0]
            if until is not None and when > until:
                return False
            heapq.heappop(self._timers)
            if fut.done():
                continue  # its sleeper was cancelled
            self.t = max(self.t, when)
            fut.set_result(None)
            return True
        return False

    async def advance(self, seconds: float) -> None:
        """Let `seconds` pass, firing every timer due on the way in order (tasks run between)."""
        target = self.t + seconds
        await settle()
        while self._fire_next(until=target):
            await settle()
        self.t = target
        await settle()

    async def run(self, awaitable: Awaitable[Any], limit_s: float = 3600.0) -> Any:
        """Await it while time jumps ahead to the next timer whenever every task waits (autojump)."""
        task = asyncio.ensure_future(awaitable)
        end = self.t + limit_s
        while True:
            await settle()
            if task.done():
                return task.result()
            if self.t > end or not self._fire_next():
                task.cancel()
                raise AssertionError(f"still waiting after {self.t - end + limit_s:.2f} virtual s "
                                     f"(nothing more scheduled: a deadlock)" if self.t <= end else
                                     f"still waiting after {limit_s} virtual s")
