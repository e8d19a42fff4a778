"""The daemon's background duties (idle sleep and stop, saving footprints, measuring) outlive their
failures: each failure is one log line naming the server, and shows in status until the duty works
again (issue 21 item 5: the idle loop used to die on its first error, silently)."""
from __future__ import annotations

import asyncio

from mmlib.errors import MMError
from mmlib.profiles.config import Config
from mmlib.serve.daemon import IDLE_CHECK_S, Daemon
from mmlib.serve.states import State
from tests.fakeclock import FakeClock
from tests.unit.test_scheduler import FakeServer, profile


def test_a_failing_idle_sleep_is_logged_shown_in_status_and_the_loop_goes_on(mm_env, caplog):
    async def go():
        daemon = Daemon(Config())
        clock = daemon.scheduler.clock = FakeClock()
        log: list[str] = []
        broken = FakeServer(profile("broken", idle_sleep=10), log, asyncio.Event())
        idle = FakeServer(profile("idle", idle_stop=20), log, asyncio.Event())
        for s in (broken, idle):
            s.state, s.last_used = State.AWAKE, clock.now()
            daemon.scheduler.servers[s.name] = s
        fails = []

        async def sleep_answering_500(level=None, keep_requests=False):
            fails.append(clock.now())
            raise MMError("broken: sleep (level 1) answered HTTP 500: engine dead")
        broken.sleep = sleep_answering_500
        loop = asyncio.ensure_future(daemon.idle_loop())
        await clock.advance(12 * IDLE_CHECK_S)
        assert len(fails) >= 2 and not loop.done()  # tried every round, the loop alive
        status = await daemon._status()
        assert status["background_errors"] == [
            {"server": "broken", "duty": "idle sleep", "error": "broken: sleep (level 1) answered HTTP 500: "
             "engine dead", "at": status["background_errors"][0]["at"], "count": len(fails)}]
        await clock.advance(10 * IDLE_CHECK_S)
        assert idle.state == State.STOPPED and log == ["stop idle"]  # the other duties still ran
        lines = [r.message for r in caplog.records if "failed" in r.message]
        assert len(lines) == 1 and lines[0].startswith(  # once per streak, not every second
            "broken: idle sleep failed: broken: sleep (level 1) answered HTTP 500")
        broken.state = State.ASLEEP  # the duty has nothing left to fail at: its error goes
        await clock.advance(IDLE_CHECK_S)
        assert (await daemon._status())["background_errors"] == []
        loop.cancel()
    asyncio.run(go())


def test_the_ram_budget_reaches_the_scheduler(mm_env):
    async def go():
        assert Daemon(Config(ram_budget=24 << 30)).scheduler.ram_budget_now() == 24 << 30
        derived = Daemon(Config()).scheduler  # from this machine's RAM (scheduler.derived_ram_budget)
        assert derived.ram_budget is None and derived.ram_budget_now() >= 0
    asyncio.run(go())
