"""The clock: monotonic seconds and a sleep. Injected where time decides something (the scheduler's
hold-offs, drains, backoffs; the daemon's idle duties), so tests run those on a clock they advance."""
from __future__ import annotations

import asyncio
import time


class Clock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
