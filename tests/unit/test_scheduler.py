"""The real scheduler against fake servers whose every step the test releases by hand (Ollama's
sched_test.go idea): starts, sleeps and wakes take as long as the test says, crashes happen when it
says, and time is a fake clock the test advances. No processes, no ports, no real time."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from mmlib.errors import MMError
from mmlib.profiles.profile import Profile, SleepSettings
from mmlib.serve.scheduler import Scheduler
from mmlib.serve.states import LIVE, State
from tests.fakeclock import FakeClock, settle


def profile(name: str, **kw) -> Profile:
    return Profile(name=name, source=f"{name}.toml", model=f"fake/{name}", served_model_name=name,
                   sleep=SleepSettings(enabled=True), **kw)


class FakeServer:
    """Implements what the scheduler uses of ManagedServer. `gate` holds every start and wake until
    the test opens it; calls are recorded in order."""

    def __init__(self, p: Profile, log: list[str], gate: asyncio.Event, broken: set[str] = frozenset()):
        self.profile, self.log, self.gate, self.broken = p, log, gate, broken
        self.state = State.STOPPED
        self.in_flight, self.restarts, self.last_used, self.last_switch_s = 0, 0, 0.0, None
        self.error, self.pid = None, None
        self.on_death = lambda s, was: None
        self.on_release = lambda s: None
        self.cancelled = False
        self.can_pause_requests = False  # vLLM's sleep with mode=keep
        self.can_checkpoint = False  # the CUDA driver's process checkpoint
        self.fails: set[str] = set()  # "checkpoint", "restore": what goes wrong for this server
        self.ram = {State.ASLEEP: 0, State.CHECKPOINTED: 0}  # bytes of RAM it holds in those states

    def memory(self) -> dict:  # what `mm status` shows
        return {}

    name = property(lambda self: self.profile.name)
    may_restart = property(lambda self: self.profile.restart == "on-failure"
                           and self.restarts < self.profile.max_restarts)

    def release(self) -> None:
        self.in_flight -= 1
        self.on_release(self)

    def snapshot(self) -> dict:
        return {"profile": self.name, "state": self.state.value, "in_flight": self.in_flight}

    async def start(self) -> None:
        if self.state == State.AWAKE:
            return
        self.log.append(f"start {self.name}")
        if self.name in self.broken:  # vLLM exits during start-up
            self.state, self.error = State.FAILED, "exited during start-up (code 1)"
            raise MMError(f"{self.name}: exited during start-up (code 1)")
        self.state = State.STARTING
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.state != State.STARTING:
            raise MMError(f"{self.name}: the start was cancelled")
        self.state = State.AWAKE

    restoring: list[int] = [0, 0]  # (restores running now, the most at once), all servers

    async def wake(self) -> None:
        if self.state == State.ASLEEP:
            self.log.append(f"wake {self.name}")
            self.state = State.AWAKE
            return
        if self.state == State.CHECKPOINTED:
            self.log.append(f"restore {self.name}")
            now = FakeServer.restoring
            now[0] += 1
            now[1] = max(now)
            await asyncio.sleep(0)  # (the driver's call runs in a thread)
            now[0] -= 1
            if "restore" in self.fails:
                self.state, self.error = State.FAILED, "restore failed"
                raise MMError(f"{self.name}: cuCheckpointProcessRestore failed (CUDA_ERROR_ILLEGAL_STATE)")
            self.state = State.AWAKE
            return
        await self.start()

    async def restore(self) -> None:  # back onto the card, still asleep (a switch's early restore)
        if self.state != State.CHECKPOINTED:
            return
        self.log.append(f"restore {self.name}")
        self.restoring_now = True  # (the card counts its residue from the first byte)
        driver, now = FakeServer.driver, FakeServer.restoring
        for count in (driver, now):
            count[0] += 1
            count[1] = max(count)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        driver[0] -= 1
        now[0] -= 1
        self.restoring_now = False
        if "restore" in self.fails:
            self.state, self.error = State.FAILED, "restore failed"
            raise MMError(f"{self.name}: cuCheckpointProcessRestore failed (CUDA_ERROR_ILLEGAL_STATE)")
        self.state = State.ASLEEP

    restoring_now = False
    driver: list[int] = [0, 0]  # (checkpoints and early restores running now, the most at once)
    checkpointing: list[int] = [0, 0]  # (checkpoints running now, the most at once), all servers

    async def checkpoint(self) -> None:
        assert self.state == State.ASLEEP and self.can_checkpoint
        self.log.append(f"checkpoint {self.name}")
        now, driver = FakeServer.checkpointing, FakeServer.driver
        now[0] += 1
        now[1] = max(now)
        driver[0] += 1
        driver[1] = max(driver)
        await asyncio.sleep(0)  # (the driver's call runs in a thread: others may start meanwhile)
        now[0] -= 1
        driver[0] -= 1
        if "checkpoint" in self.fails:
            self.state, self.error = State.FAILED, "checkpoint failed"
            raise MMError(f"{self.name}: cuCheckpointProcessCheckpoint failed (CUDA_ERROR_NOT_SUPPORTED)")
        self.state = State.CHECKPOINTED

    def host_bytes(self) -> int | None:
        return self.ram.get(self.state, 0)

    async def sleep(self, level=None, keep_requests=False) -> None:
        if self.state == State.AWAKE:
            assert keep_requests or self.in_flight == 0, "a sleep would abort the requests in flight"
            self.log.append(f"sleep {self.name}" + (f" level {level}" if level else "")
                            + (f" keeping {self.in_flight}" if keep_requests else ""))
            self.state = State.ASLEEP

    async def stop(self) -> None:
        if self.state in LIVE or self.state == State.FAILED:
            self.log.append(f"stop {self.name}")
        self.state = State.STOPPED

    def crash(self) -> None:
        was, self.state, self.error = self.state, State.FAILED, "died"
        self.on_death(self, was)


class World:
    def __init__(self, *profiles: Profile):
        self.log: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.clock = FakeClock()
        self.broken: set[str] = set()  # profiles whose start fails
        self.profiles = {p.name: p for p in profiles}
        self.pausable = False  # servers whose sleep can keep the requests in flight (vLLM 0.26+)
        self.sched = Scheduler(self._server, load=self.profiles.__getitem__, clock=self.clock)

    def _server(self, p: Profile) -> FakeServer:
        server = FakeServer(p, self.log, self.gate, self.broken)
        server.can_pause_requests = self.pausable
        return server

    def server(self, name: str) -> FakeServer:
        return self.sched.servers[name]


def run(coro):
    return asyncio.run(coro)


def test_a_crash_while_serving_restarts_through_the_scheduler_after_a_backoff():
    async def go():
        w = World(profile("a"), profile("b"))
        await w.sched.activate(w.profiles["a"])
        w.server("a").crash()
        await w.clock.advance(0.99)
        assert w.server("a").state == State.FAILED  # waiting 1 s, not restarted yet
        await w.clock.advance(0.01)
        assert w.server("a").state == State.AWAKE and w.server("a").restarts == 1
        assert w.log == ["start a", "start a"] and w.sched.active == ["a"]
    run(go())


def test_mm_stop_during_the_backoff_is_not_undone():
    async def go():
        w = World(profile("a"))
        await w.sched.activate(w.profiles["a"])
        w.server("a").crash()
        await settle()
        await w.sched.stop("a")
        await w.clock.advance(30)
        assert w.server("a").state == State.STOPPED and w.log == ["start a", "stop a"]
    run(go())


def test_a_server_that_crashed_asleep_does_not_come_back_awake_beside_the_active_one():
    async def go():
        w = World(profile("a"), profile("b"))
        await w.sched.activate(w.profiles["a"])
        await w.sched.activate(w.profiles["b"])  # a sleeps
        assert w.server("a").state == State.ASLEEP
        w.server("a").crash()
        await w.clock.advance(30)
        assert w.log == ["start a", "sleep a", "start b"]  # no restart
        assert w.server("a").state == State.FAILED and w.server("b").state == State.AWAKE
        # ... and its next request starts it the normal way: b sleeps first
        server = await w.sched.acquire(w.profiles["a"])
        assert server.name == "a" and w.server("b").state == State.ASLEEP
        assert w.log[-2:] == ["sleep b", "start a"]
    run(go())


def test_the_restart_policy_bounds_restarts():
    async def go():
        w = World(profile("a", max_restarts=1))
        await w.sched.activate(w.profiles["a"])
        w.server("a").crash()
        await w.clock.advance(1.0)
        assert w.server("a").state == State.AWAKE
        w.server("a").crash()
        await w.clock.advance(30)
        assert w.server("a").state == State.FAILED and w.log == ["start a", "start a"]
        with pytest.raises(MMError, match="mm up a"):
            await w.sched.acquire(w.profiles["a"])
    run(go())


def test_a_starting_server_is_stopped_at_once_not_after_its_load():
    async def go():
        w = World(profile("a"))
        w.gate.clear()  # the load never ends by itself
        starting = asyncio.ensure_future(w.sched.activate(w.profiles["a"]))
        await settle()
        assert w.server("a").state == State.STARTING
        await asyncio.wait_for(w.sched.stop("a"), 1.0)  # not behind the switch that started it
        assert w.server("a").state == State.STOPPED
        with pytest.raises(MMError, match="cancelled"):
            w.gate.set()
            await starting
    run(go())


def test_sleep_waits_for_requests_counted_on_the_server():
    async def go():
        w = World(profile("a"))
        server = await w.sched.acquire(w.profiles["a"])
        sleeping = asyncio.ensure_future(w.sched.sleep("a"))
        await settle()
        assert server.state == State.AWAKE and not sleeping.done()  # the request is still running
        server.release()
        await asyncio.wait_for(sleeping, 1.0)
        assert server.state == State.ASLEEP
    run(go())


def test_a_request_that_gives_up_while_a_switch_runs_gives_its_place_back():
    async def go():
        w = World(profile("a"), profile("b"))
        await w.sched.activate(w.profiles["a"])
        w.gate.clear()
        waiting = asyncio.ensure_future(w.sched.acquire(w.profiles["b"]))
        await settle()
        assert w.sched.waiting("b") == 1
        waiting.cancel()  # its client went away
        await settle()
        assert w.sched.waiting("b") == 0
        w.gate.set()
        await settle()
        assert w.server("b").in_flight == 0  # nothing left counted on b by the request that left
    run(go())


def test_requests_during_a_switch_wait_and_are_counted_before_the_next_switch():
    async def go():
        w = World(profile("a"), profile("b"))
        await w.sched.activate(w.profiles["a"])
        w.gate.clear()
        for_b = [asyncio.ensure_future(w.sched.acquire(w.profiles["b"])) for _ in range(3)]
        await settle()  # the switch to b is under way (b is loading)
        for_a = asyncio.ensure_future(w.sched.acquire(w.profiles["a"]))  # queued behind it
        await settle()
        w.gate.set()
        servers = await asyncio.gather(*for_b)
        assert {s.name for s in servers} == {"b"} and w.server("b").in_flight == 3
        await settle()
        assert not for_a.done()  # a waits until b's three requests are answered
        for s in servers:
            s.release()
        assert (await asyncio.wait_for(for_a, 1.0)).name == "a"
        assert w.log == ["start a", "sleep a", "start b", "sleep b", "wake a"]
    run(go())


def test_a_shutting_down_scheduler_takes_no_new_work():
    async def go():
        w = World(profile("a"))
        await w.sched.activate(w.profiles["a"])
        await w.sched.close()
        assert w.server("a").state == State.STOPPED
        with pytest.raises(MMError, match="shutting down"):
            await w.sched.acquire(w.profiles["a"])
        with pytest.raises(MMError, match="shutting down"):
            await w.sched.activate(w.profiles["a"])
    run(go())


def test_a_crash_during_shutdown_is_not_restarted():
    async def go():
        w = World(profile("a"))
        await w.sched.activate(w.profiles["a"])
        w.sched.closed = True
        w.server("a").crash()
        await w.clock.advance(30)
        assert w.log == ["start a"] and w.server("a").state == State.FAILED
    run(go())


def test_profile_change_while_down_gets_a_fresh_server():
    async def go():
        w = World(profile("a"))
        await w.sched.activate(w.profiles["a"])
        old = w.server("a")
        await w.sched.stop("a")
        changed = dataclasses.replace(w.profiles["a"], max_restarts=7)
        await w.sched.activate(changed)
        assert w.server("a") is not old and w.server("a").profile.max_restarts == 7
    run(go())


# --- memory in bytes: co-residence, eviction, settling, the budget ------------------------------------
GIB = 1 << 30


class FakeCard:
    """A card of `capacity` bytes. Servers hold prints[name] awake/asleep; a stopped server's memory
    shows as free only after `lag` reads of free() (vLLM lets go a moment after its process ends)."""

    def __init__(self, world: World, capacity: int, prints: dict[str, tuple[float, float]], lag: int = 0,
                 resting: dict[str, float] | None = None):
        self.world, self.cap, self.lag = world, capacity, lag
        self.prints = {n: Footprint(int(a * GIB), int(s * GIB)) for n, (a, s) in prints.items()}
        # what a server holds once it serves, where less than its start's peak (prints' awake)
        self.resting = {n: int(g * GIB) for n, g in (resting or {}).items()}
        self.ghosts: list[list[int]] = []  # [bytes, reads left]
        self.budget = None
        self.peak = 0

    def _used(self) -> int:
        used = 0
        for s in self.world.sched.servers.values():
            fp = self.prints[s.name]
            used += self.resting.get(s.name, fp.awake) if s.state == State.AWAKE else \
                fp.awake if s.state in (State.STARTING, State.WAKING) else \
                fp.asleep if s.state == State.ASLEEP or s.restoring_now else 0
        return used + sum(g[0] for g in self.ghosts)

    def cards(self) -> list[int]:
        return []  # one card, none named (tests/unit/test_multigpu.py has several)

    def capacity(self) -> int:
        return self.cap

    def free(self) -> int:
        used = self._used()
        self.peak = max(self.peak, used)
        for g in self.ghosts:
            g[1] -= 1
        self.ghosts = [g for g in self.ghosts if g[1] > 0]
        return self.cap - used

    def held(self, pid) -> int | None:
        s = next((s for s in self.world.sched.servers.values() if s.pid == pid), None)
        if s is None:
            return None
        fp = self.prints[s.name]
        return self.resting.get(s.name, fp.awake) if s.state == State.AWAKE else fp.asleep

    def predict(self, profile) -> Footprint:
        fp = self.prints[profile.name]
        return Footprint(fp.awake, fp.asleep)


from mmlib.guard.fit import Footprint  # noqa: E402
from mmlib.serve.scheduler import Policy  # noqa: E402


def card_world(capacity_gib: float, prints: dict[str, tuple[float, float]], lag: int = 0,
               resting: dict[str, float] | None = None) -> tuple[World, FakeCard]:
    w = World(*(profile(n) for n in prints))
    card = FakeCard(w, int(capacity_gib * GIB), prints, lag, resting)
    w.sched.memory = card
    w.sched.policy = Policy(max_wait_s=1.0, settle_timeout_s=5.0)
    original_stop = FakeServer.stop

    async def stop_leaving_a_ghost(self):
        was = self.state
        await original_stop(self)
        fp = card.prints[self.name]
        held = fp.awake if was == State.AWAKE else fp.asleep if was == State.ASLEEP else 0
        if held and card.lag:
            card.ghosts.append([held, card.lag])
    for s in prints:
        w.sched.server_for(w.profiles[s])
    for server in w.sched.servers.values():
        server.pid = hash(server.name) & 0xFFFF
        server.stop = stop_leaving_a_ghost.__get__(server)
    return w, card


def test_models_that_fit_together_stay_awake_together():
    async def go():
        w, card = card_world(12, {"chat": (6, 1), "title": (3, 0.5)})
        await w.sched.activate(w.profiles["chat"])
        await w.sched.activate(w.profiles["title"])
        assert w.server("chat").state == State.AWAKE and w.server("title").state == State.AWAKE
        assert "sleep chat" not in w.log
    run(go())


def test_a_target_that_does_not_fit_puts_the_others_to_sleep():
    async def go():
        w, card = card_world(12, {"chat": (9, 1), "title": (4, 0.5)})
        await w.sched.activate(w.profiles["chat"])
        await w.sched.activate(w.profiles["title"])
        assert w.server("chat").state == State.ASLEEP and w.server("title").state == State.AWAKE
        assert card.peak <= card.cap
    run(go())


def test_the_least_recently_used_sleepers_are_stopped_when_residues_leave_no_room():
    async def go():
        # Three sleepers keep 1.5 GiB each: a 9 GiB target does not fit beside all of them on 12 GiB.
        w, card = card_world(12, {"a": (8, 1.5), "b": (8, 1.5), "c": (8, 1.5), "big": (9, 1)})
        for n in ("a", "b", "c"):
            await w.sched.activate(w.profiles[n])
        assert [w.server(n).state for n in "abc"] == [State.ASLEEP, State.ASLEEP, State.AWAKE]
        await w.sched.activate(w.profiles["big"])
        # c slept (1.5) and a, the least recently used, was stopped: 9 + 1.5 + 1.5 = 12 fits
        assert w.server("a").state == State.STOPPED
        assert (w.server("b").state, w.server("c").state) == (State.ASLEEP, State.ASLEEP)
        assert w.server("big").state == State.AWAKE and card.peak <= card.cap
    run(go())


def test_a_restart_counts_its_peak_not_what_was_measured_at_rest():
    """perf peaks at 11.5 GiB while it starts and keeps 10.5 once it serves (all NVML shows then).
    Started again after a stop, it must not be let in beside a 1 GiB server on a 12 GiB card."""
    async def go():
        w, card = card_world(12, {"perf": (11.5, 1.2), "small": (1.0, 0.9)}, resting={"perf": 10.5})
        await w.sched.activate(w.profiles["perf"])
        w.sched.measure(w.server("perf"))
        assert w.sched.footprint(w.profiles["perf"]).awake == int(10.5 * GIB)  # measured, at rest
        await w.sched.stop("perf")
        await w.sched.activate(w.profiles["small"])
        starts_beside = []
        original_start = FakeServer.start

        async def start(self):
            starts_beside.append(card._used())  # what others hold as this start begins
            await original_start(self)
        w.server("perf").start = start.__get__(w.server("perf"))
        await w.sched.activate(w.profiles["perf"])
        assert w.server("perf").state == State.AWAKE and w.server("small").state == State.STOPPED
        assert starts_beside == [0]  # 11.5 + 0.9 asleep would not fit; 10.5 + 1.0 awake looked as if it did
        # a wake is no start: woken, a server holds what it held at rest, so 10.5 + 1.0 fits
        await w.sched.sleep("perf")
        await w.sched.activate(w.profiles["small"])
        await w.sched.activate(w.profiles["perf"])
        assert w.server("perf").state == State.AWAKE and w.server("small").state == State.AWAKE
        assert card.peak <= card.cap
    run(go())


def test_a_start_waits_until_the_card_shows_the_memory_free():
    async def go():
        w, card = card_world(12, {"a": (8, 1.5), "b": (8, 1.5), "big": (10, 1)}, lag=3)
        await w.sched.activate(w.profiles["a"])
        await w.sched.activate(w.profiles["b"])
        reads = []
        original = card.free

        def counting_free():
            value = original()
            reads.append(value)
            return value
        card.free = counting_free
        await w.clock.run(w.sched.activate(w.profiles["big"]))
        # a was stopped; its memory showed free only after the lag; big started after that
        assert reads and min(reads) < 10 * GIB <= reads[-1]
        assert w.server("big").state == State.AWAKE
    run(go())


def test_stop_returns_only_once_the_memory_is_free():
    async def go():
        w, card = card_world(12, {"a": (8, 1)}, lag=4)
        await w.sched.activate(w.profiles["a"])
        await w.clock.run(w.sched.stop("a"))
        assert card.free() == card.cap  # nothing left held when stop returned
    run(go())


def test_the_budget_is_never_exceeded_over_many_switches():
    async def go():
        import random

        prints = {"chat": (7, 1.2), "coder": (8, 1.4), "small": (2.5, 0.6), "ocr": (4, 0.8), "stt": (2, 0.5)}
        w, card = card_world(12, prints, lag=2)
        rng = random.Random(7)
        for _ in range(60):
            name = rng.choice(list(prints))
            await w.clock.run(w.sched.activate(w.profiles[name]))
            assert w.server(name).state == State.AWAKE
            assert card._used() <= card.cap
        assert card.peak <= card.cap
    run(go())


# --- mixed traffic: switches are amortised, nobody starves -------------------------------------------------
def test_the_awake_model_keeps_serving_while_the_other_waits_less_than_the_bound():
    async def go():
        w = World(profile("a"), profile("b"))
        w.sched.policy = Policy(max_wait_s=0.3)
        await w.sched.activate(w.profiles["a"])
        busy = await w.sched.acquire(w.profiles["a"])  # a is serving
        waiting_b = asyncio.ensure_future(w.sched.acquire(w.profiles["b"]))
        await w.clock.advance(0.05)
        more_a = await asyncio.wait_for(w.sched.acquire(w.profiles["a"]), 0.1)  # served at once, no switch
        assert more_a.name == "a" and not waiting_b.done()
        t0 = w.clock.now()
        # a stays busy: b is served once its request has waited the bound (plus a's drain)
        await w.clock.advance(0.3)
        busy.release()
        more_a.release()
        got = await w.clock.run(waiting_b)
        assert got.name == "b" and w.clock.now() - t0 < 1.0
        assert w.log == ["start a", "sleep a", "start b"]
    run(go())


def test_a_switch_happens_at_once_when_the_awake_model_is_idle():
    async def go():
        w = World(profile("a"), profile("b"))
        w.sched.policy = Policy(max_wait_s=30)
        await w.sched.activate(w.profiles["a"])
        got = await asyncio.wait_for(w.sched.acquire(w.profiles["b"]), 1.0)  # a has nothing in flight
        assert got.name == "b"
    run(go())


@pytest.mark.parametrize("pausing", [False, True])
def test_under_a_steady_mix_no_model_starves_and_every_request_gets_its_model(pausing):
    async def go():
        import random

        w = World(profile("big"), profile("small"))
        w.sched.policy = Policy(max_wait_s=0.05, pause_after_s=0.005)  # pausing: nearly every switch
        w.pausable = pausing
        rng = random.Random(3)
        waits = {"big": [], "small": []}
        served_by = []

        async def client(i):
            for _ in range(25):
                name = "small" if rng.random() < 0.1 else "big"
                t0 = w.clock.now()
                server = await w.sched.acquire(w.profiles[name])
                waits[name].append(w.clock.now() - t0)
                assert server.state == State.AWAKE
                served_by.append((name, server.name))
                await w.clock.sleep(rng.uniform(0.001, 0.01))  # the request runs
                server.release()
        await w.clock.run(asyncio.gather(*(client(i) for i in range(16))), 60)
        assert len(served_by) == 400 and all(a == b for a, b in served_by)
        # every wait is bounded: max_wait + the longest request in flight + switches (instant here)
        assert max(waits["small"]) < 0.5 and max(waits["big"]) < 0.5
        switches = sum(1 for e in w.log if e.startswith(("start", "wake")))
        assert switches < 100  # far fewer than the ~70 rare requests x 2 of a switch per request
    run(go())


def test_the_proxy_does_not_route_by_a_stopped_servers_old_model_name():
    from mmlib.serve.proxy import Proxy

    async def go():
        w = World(profile("chat"))
        override = dataclasses.replace(w.profiles["chat"], model="org/other", served_model_name="other")
        await w.sched.activate(override)

        class Index:
            by_name = {}

            def lookup(self, name):
                return None
        proxy = Proxy(w.sched, Index(), lambda: w.profiles["chat"])
        assert proxy.resolve("other") is override  # live: `mm chat org/other` is served by name
        await w.sched.stop("chat")
        assert proxy.resolve("other") is None  # stopped: the name no longer routes anywhere
    run(go())


def test_a_long_answer_pauses_after_the_bound_and_goes_on_once_its_model_is_back():
    """A switch no longer waits for an answer of any length: after max_wait_s of hold and pause_after_s
    for the requests in flight, they pause with their server (vLLM's mode=keep), and the server comes
    back for them as it would for a waiting request."""
    async def go():
        w = World(profile("a"), profile("b"))
        w.pausable = True
        w.sched.policy = Policy(max_wait_s=0.1, pause_after_s=0.1)
        await w.sched.activate(w.profiles["a"])
        long_answer = await w.sched.acquire(w.profiles["a"])  # streams for minutes
        t0 = w.clock.now()
        b = await w.clock.run(w.sched.acquire(w.profiles["b"]))
        assert b.name == "b" and w.clock.now() - t0 < 0.5  # 0.1 hold + 0.1 drain
        assert w.log == ["start a", "sleep a keeping 1", "start b"]
        assert long_answer.state == State.ASLEEP and long_answer.in_flight == 1  # paused, not cut off
        # both answers run on: the two servers take turns, each serving at least the bound
        await w.clock.advance(0.3)
        assert w.log[3:5] == ["sleep b keeping 1", "wake a"] and long_answer.state == State.AWAKE
        long_answer.release()  # a's answer ends: b comes back at once for its paused one
        await settle()
        assert b.state == State.AWAKE and long_answer.state == State.ASLEEP
        assert w.log[-2:] == ["sleep a", "wake b"]
        b.release()
        await w.clock.advance(0.3)
        assert w.log[-1] == "wake b"  # nothing paused or waiting: no more switches
    run(go())


@pytest.mark.parametrize("pausable, policy", [
    (False, Policy(max_wait_s=0.05)),  # vLLM before 0.26, or the CPU: a sleep cannot keep requests
    (True, Policy(max_wait_s=0.05, pause_after_s=0.05, pause_in_flight=False)),  # config.toml turns it off
    (True, Policy(max_wait_s=0.05, pause_after_s=1.0)),  # the answer ends within pause_after_s
], ids=["vllm-cannot-pause", "pausing-off", "ends-within-pause-after"])
def test_a_switch_waits_for_the_answer_in_flight_where_it_does_not_pause(pausable, policy):
    async def go():
        w = World(profile("a"), profile("b"))
        w.pausable = pausable
        w.sched.policy = policy
        await w.sched.activate(w.profiles["a"])
        answer = await w.sched.acquire(w.profiles["a"])
        waiting_b = asyncio.ensure_future(w.sched.acquire(w.profiles["b"]))
        await w.clock.advance(0.3)  # past the hold: the switch waits for the answer
        assert not waiting_b.done() and w.log == ["start a"]
        answer.release()
        assert (await w.clock.run(waiting_b)).name == "b"
        assert w.log == ["start a", "sleep a", "start b"]  # a plain sleep: nothing was paused
    run(go())


def test_mm_stop_of_a_server_holding_paused_requests_does_not_bring_it_back():
    async def go():
        w = World(profile("a"), profile("b"))
        w.pausable = True
        w.sched.policy = Policy(max_wait_s=0.05, pause_after_s=0.05)
        await w.sched.activate(w.profiles["a"])
        long_answer = await w.sched.acquire(w.profiles["a"])
        b = await w.clock.run(w.sched.acquire(w.profiles["b"]))  # a pauses its answer
        assert w.log[-2:] == ["sleep a keeping 1", "start b"]
        await w.sched.stop("a")  # the paused answer ends with the server
        long_answer.release()
        b.release()
        await w.clock.advance(0.3)
        assert long_answer.state == State.STOPPED and w.log[-1] == "stop a"
    run(go())


# --- issue 21: activations belong to the scheduler; start failures back off -----------------------------
def test_a_paused_server_stopped_while_another_starts_starts_again_on_its_next_request():
    """Issue 21 item 4: the come-back of a paused server, cancelled by `mm stop` while it waited for a
    cold start to finish, left its entry behind, and every later request for it awaited the cancelled
    task."""
    async def go():
        w = World(profile("a"), profile("b"))
        w.pausable = True
        w.sched.policy = Policy(max_wait_s=0.02, pause_after_s=0.02)
        await w.sched.activate(w.profiles["a"])
        long_answer = await w.sched.acquire(w.profiles["a"])
        w.gate.clear()  # b cold-starts for a long time
        for_b = asyncio.ensure_future(w.sched.acquire(w.profiles["b"]))
        await w.clock.advance(0.15)
        assert w.log == ["start a", "sleep a keeping 1", "start b"]  # a's come-back waits behind b's start
        await w.sched.stop("a")
        long_answer.release()
        w.gate.set()
        (await w.clock.run(for_b)).release()
        got = await w.clock.run(w.sched.acquire(w.profiles["a"]))
        assert got.name == "a" and got.state == State.AWAKE and w.log[-2:] == ["sleep b", "start a"]
    run(go())


def test_a_paused_sleeper_stopped_to_make_room_is_not_started_again_for_nobody():
    """Issue 21 item 6."""
    async def go():
        w, card = card_world(12, {"a": (8, 2), "b": (8, 1), "c": (10.5, 1)})
        for s in w.sched.servers.values():
            s.can_pause_requests = True
        w.sched.policy = Policy(max_wait_s=0.02, pause_after_s=0.02, settle_timeout_s=1)
        await w.sched.activate(w.profiles["a"])
        await w.sched.acquire(w.profiles["a"])  # a long answer
        b = await w.clock.run(w.sched.acquire(w.profiles["b"]))
        b.release()
        assert "sleep a keeping 1" in w.log
        await w.clock.run(w.sched.activate(w.profiles["c"]))  # b's and a's residues must go
        assert w.server("a").state == State.STOPPED
        await w.clock.advance(5)
        assert w.log.count("start a") == 1 and w.server("c").state == State.AWAKE
        assert w.sched.waiting("a") == 0
    run(go())


def test_a_paused_answer_whose_client_left_is_not_woken_for_nobody():
    """Issue 21 item 10 (the scheduler's part): the paused requests release their count, and the
    come-back of a server with nothing paused in it any more is dropped."""
    async def go():
        w = World(profile("a"), profile("b"))
        w.pausable = True
        w.sched.policy = Policy(max_wait_s=0.05, pause_after_s=0.02)
        await w.sched.activate(w.profiles["a"])
        long_answer = await w.sched.acquire(w.profiles["a"])
        b = await w.clock.run(w.sched.acquire(w.profiles["b"]))
        assert w.log[-2:] == ["sleep a keeping 1", "start b"]
        long_answer.release()  # its client went away while it was paused
        await w.clock.advance(1)
        b.release()
        await w.clock.advance(1)
        assert w.log[-1] == "start b" and w.server("a").state == State.ASLEEP
    run(go())


def test_a_failing_start_backs_off_and_sleeps_nothing_while_it_does():
    """Issue 21 item 7: a start failure spends the restart budget like a crash. Until its backoff
    ends a request for it is answered at once and the working model is left alone; past
    max_restarts it is FATAL until `mm up`, which tries at once."""
    async def go():
        w = World(profile("good"), profile("bad", max_restarts=1))
        w.broken.add("bad")
        await w.sched.activate(w.profiles["good"])
        with pytest.raises(MMError, match="exited during start-up"):
            await w.clock.run(w.sched.acquire(w.profiles["bad"]))
        assert w.log == ["start good", "sleep good", "start bad"]
        (await w.clock.run(w.sched.acquire(w.profiles["good"]))).release()  # woken again
        with pytest.raises(MMError, match=r"bad failed to start \(bad: exited during start-up.*next try in 1 s"):
            await w.sched.acquire(w.profiles["bad"])
        assert w.log == ["start good", "sleep good", "start bad", "wake good"]  # good was not slept
        assert w.sched.start_status("bad") == {"failed_starts": 1, "retry_in_s": 1.0, "start_fatal": False,
                                               "start_error": "bad: exited during start-up (code 1)"}
        await w.clock.advance(1)  # the backoff is over: the next request tries again
        with pytest.raises(MMError, match="exited during start-up"):
            await w.clock.run(w.sched.acquire(w.profiles["bad"]))
        assert w.log.count("start bad") == 2
        await w.clock.advance(60)  # past max_restarts: FATAL, whatever the time
        with pytest.raises(MMError, match=r"failed to start 2 times .*`mm up bad` tries again"):
            await w.sched.acquire(w.profiles["bad"])
        assert w.sched.start_status("bad")["start_fatal"] and w.log.count("start bad") == 2
        w.broken.clear()  # fixed; `mm up` tries at once
        assert (await w.clock.run(w.sched.activate(w.profiles["bad"])))[-1].state == State.AWAKE
        assert w.sched.start_status("bad")["failed_starts"] == 0
    run(go())


def test_a_changed_profile_is_not_held_to_the_old_ones_backoff():
    async def go():
        w = World(profile("good"), profile("bad"))
        w.broken.add("bad")
        await w.sched.activate(w.profiles["good"])
        with pytest.raises(MMError):
            await w.clock.run(w.sched.acquire(w.profiles["bad"]))
        w.broken.clear()
        fixed = dataclasses.replace(w.profiles["bad"], max_restarts=5)  # the user edited it
        assert (await w.clock.run(w.sched.acquire(fixed))).state == State.AWAKE
    run(go())


def test_a_request_that_leaves_before_its_switch_runs_drops_the_switch():
    async def go():
        w = World(profile("a"), profile("b"))
        w.sched.policy = Policy(max_wait_s=1.0)
        await w.sched.activate(w.profiles["a"])
        busy = await w.sched.acquire(w.profiles["a"])
        waiting_b = asyncio.ensure_future(w.sched.acquire(w.profiles["b"]))
        await w.clock.advance(0.5)  # held off: a is serving
        waiting_b.cancel()
        await w.clock.advance(5)
        busy.release()
        await settle()
        assert w.log == ["start a"] and w.sched.waiting("b") == 0
    run(go())


# --- issue 20: room by checkpoint, and host RAM -----------------------------------------------------------
def checkpoint_world(prints: dict[str, tuple[float, float]], capacity_gib: float = 12, ram_asleep_gib: float = 4,
                     ram_budget_gib: float | None = None, total_ram_gib: float | None = None,
                     others_ram_gib: float = 0) -> tuple[World, FakeCard]:
    """A card world whose sleepers can be checkpointed: asleep each holds ram_asleep_gib of RAM (its
    weights), checkpointed that plus its GPU residue. total_ram_gib: a machine whose other programs hold
    others_ram_gib."""
    w, card = card_world(capacity_gib, prints)
    for s in w.sched.servers.values():
        s.can_checkpoint = True
        s.ram = {State.ASLEEP: int(ram_asleep_gib * GIB),
                 State.CHECKPOINTED: int(ram_asleep_gib * GIB) + card.prints[s.name].asleep}
    w.sched.ram_budget = None if ram_budget_gib is None else int(ram_budget_gib * GIB)
    if total_ram_gib is not None:
        def host_ram():
            mine = sum(s.host_bytes() for s in w.sched.servers.values() if s.state in LIVE)
            return int(total_ram_gib * GIB), int((total_ram_gib - others_ram_gib) * GIB) - mine
        w.sched.host_ram = host_ram
    return w, card


FOUR = {"a": (8, 1.5), "b": (8, 1.5), "c": (8, 1.5), "big": (9, 1)}


async def visit(w: World, *names: str) -> None:
    for n in names:
        await w.clock.run(w.sched.activate(w.profiles[n]))


def test_a_sleeper_is_checkpointed_instead_of_stopped_and_restored_on_its_next_use():
    async def go():
        w, card = checkpoint_world(FOUR, ram_budget_gib=100)
        await visit(w, "a", "b", "c", "big")
        # 9 + three residues of 1.5 > 12: a, the least recently used, leaves the card but not RAM
        assert [w.server(n).state for n in ("a", "b", "c")] == [State.CHECKPOINTED, State.ASLEEP, State.ASLEEP]
        assert "checkpoint a" in w.log and "stop a" not in w.log and card.peak <= card.cap
        await visit(w, "a")
        assert w.log[-3:] == ["sleep big", "restore a", "wake a"] and w.log.count("start a") == 1
        assert w.server("a").state == State.AWAKE and card.peak <= card.cap
    run(go())


def test_a_checkpointed_target_is_restored_while_the_others_are_checkpointed():
    """On the H100 a switch checkpointed the sleepers in its way (0.5-1.6 s), then restored its target
    (0.8-1.2 s): where the target's residue fits meanwhile, the two overlap."""
    async def go():
        w, card = checkpoint_world({n: (8, 1.5) for n in "abcd"}, ram_budget_gib=100)
        await visit(w, "a", "b", "c", "d")  # 8 + three residues of 1.5 > 12: a leaves the card
        assert w.server("a").state == State.CHECKPOINTED
        FakeServer.driver[:] = [0, 0]
        await visit(w, "a")  # d sleeps; a's 8 beside three residues does not fit: b leaves, a comes back
        assert w.log[-4:-1] == ["sleep d", "restore a", "checkpoint b"] and w.log[-1] == "wake a"
        assert FakeServer.driver[1] == 2, "the restore and the checkpoint ran at once"
        assert w.server("a").state == State.AWAKE and card.peak <= card.cap
    run(go())


def test_a_target_is_restored_early_only_where_its_residue_fits_beside_what_the_card_holds():
    async def go():
        w, card = checkpoint_world({"a": (7, 3.8), "b": (7, 4), "c": (7, 4)}, ram_budget_gib=100)
        await visit(w, "a", "b", "c")  # c beside both residues does not fit: a leaves the card
        assert w.server("a").state == State.CHECKPOINTED
        FakeServer.driver[:] = [0, 0]
        await visit(w, "a")  # after c sleeps the card holds 8 of 12: a's 3.8 (and slack) would not fit
        assert w.log[-3:] == ["sleep c", "checkpoint b", "restore a"]  # (restored by its wake)
        assert FakeServer.driver[1] == 1 and card.peak <= card.cap
    run(go())


def test_the_sleepers_a_switch_needs_off_the_card_are_checkpointed_together():
    """One after another, three checkpoints took 2.5 s of a switch (the H100 rotation12 run)."""
    async def go():
        w, card = checkpoint_world({"a": (4, 1.5), "b": (4, 1.5), "c": (4, 1.5), "big": (11, 1)}, ram_budget_gib=100)
        FakeServer.checkpointing[:] = [0, 0]
        await visit(w, "a", "b", "c", "big")  # 11 + 1.5 > 12: all three residues must go
        assert sorted(e for e in w.log if e.startswith("checkpoint")) == ["checkpoint a", "checkpoint b", "checkpoint c"]
        assert FakeServer.checkpointing[1] == 3 and card.peak <= card.cap
    run(go())


def test_a_stacks_checkpointed_members_are_restored_together():
    async def go():
        w, card = checkpoint_world({"llm": (4, 1.5), "stt": (2, 1), "big": (11.5, 1)}, ram_budget_gib=100)
        voice = profile("voice", stack=("llm", "stt"))
        members = {"llm": profile("llm", share_gpu=True, engine={"gpu_memory_utilization": 0.4}),
                   "stt": profile("stt", share_gpu=True, engine={"gpu_memory_utilization": 0.2})}
        for name, p in members.items():
            w.server(name).profile = p
        w.profiles.update(voice=voice, **members)
        await visit(w, "voice", "big")  # both members asleep, then off the card for big
        assert (w.server("llm").state, w.server("stt").state) == (State.CHECKPOINTED, State.CHECKPOINTED)
        FakeServer.restoring[:] = [0, 0]
        await visit(w, "voice")
        assert (w.server("llm").state, w.server("stt").state) == (State.AWAKE, State.AWAKE)
        assert FakeServer.restoring[1] == 2 and card.peak <= card.cap
    run(go())


def test_nothing_is_checkpointed_while_everything_fits():
    async def go():
        w, card = checkpoint_world({"a": (8, 1), "b": (8, 1), "c": (2, 0.5)}, ram_budget_gib=100)
        await visit(w, "a", "b", "c", "a", "b", "a")
        assert not any(e.startswith("checkpoint") for e in w.log)
        assert not any(e.startswith("stop") for e in w.log)
    run(go())


def test_the_ram_budget_stops_the_least_recently_used_sleeper_after_a_sleep():
    async def go():
        w, card = checkpoint_world(FOUR, ram_budget_gib=10)  # two sleepers' weights (4 GiB each) fit
        await visit(w, "a", "b", "c", "big")  # c's sleep would make three
        assert w.server("a").state == State.STOPPED and "checkpoint a" not in w.log
        assert (w.server("b").state, w.server("c").state) == (State.ASLEEP, State.ASLEEP)
        assert w.server("big").state == State.AWAKE and card.peak <= card.cap
    run(go())


def test_a_checkpoint_that_would_exceed_the_ram_budget_is_a_stop():
    async def go():
        w, card = checkpoint_world(FOUR, ram_budget_gib=13)  # 3 x 4 fits; + a's 1.5 residue does not
        await visit(w, "a", "b", "c", "big")
        assert w.server("a").state == State.STOPPED and "checkpoint a" not in w.log
        assert w.server("big").state == State.AWAKE and card.peak <= card.cap
    run(go())


def test_sleepers_stop_before_the_machine_would_swap():
    async def go():
        # 32 GiB, 22 held by other programs: two sleepers' 4 GiB each leave 2 GiB free (floor 1.6)
        w, card = checkpoint_world({"a": (8, 1), "b": (8, 1), "c": (8, 1)}, ram_budget_gib=100,
                                   total_ram_gib=32, others_ram_gib=22)
        await visit(w, "a", "b", "c", "a")  # a third sleeper would leave -2 GiB
        assert "stop b" in w.log and w.server("c").state == State.ASLEEP
        assert w.sched.host_ram()[1] >= 1.6 * GIB
    run(go())


def test_ram_freed_late_stops_only_as_many_sleepers_as_the_deficit():
    """A stopped process's RAM shows as free a moment later. Judged again after each stop, the
    deficit never shrank and every sleeper went (the H200 rotation12 run: six stopped in 0.5 s)."""
    async def go():
        w, card = checkpoint_world({"a": (8, 1), "b": (8, 1), "c": (8, 1), "d": (8, 1)}, ram_budget_gib=100)
        await visit(w, "a", "b", "c", "d")
        assert [w.server(n).state in (State.ASLEEP, State.CHECKPOINTED) for n in "abc"] == [True] * 3
        w.sched.host_ram = lambda: (32 * GIB, 1 * GIB)  # 0.6 GiB under the floor, and it stays so a while
        await w.clock.run(w.sched.keep_ram())
        assert [e for e in w.log if e.startswith("stop")] == ["stop a"]  # one sleeper's 4 GiB covers it
    run(go())


def test_a_second_judgment_soon_after_counts_what_the_first_stop_is_freeing():
    """The H100 rotation12 run: perf (70 GiB) stopped, and 70 ms later the budget derived from what
    other programs seemed to hold (its RAM not yet shown as free) had fallen to 30 GiB: voice went too."""
    async def go():
        # 32 GiB, other programs 8: the derived budget is 0.8 x 32 - 8 = 17.6 GiB for mm
        w, card = checkpoint_world({"a": (8, 1), "b": (8, 1), "c": (8, 1), "d": (8, 1)}, total_ram_gib=32,
                                   others_ram_gib=8)
        w.server("d").ram[State.AWAKE] = 6 * GIB
        await visit(w, "a", "b", "c", "d")  # 3 x 4 asleep + 6 awake = 18 > 17.6: a goes
        await w.clock.advance(2)
        assert [e for e in w.log if e.startswith("stop")] == ["stop a"]
        lagging = w.sched.host_ram()  # a's 4 GiB shows as free only seconds later
        w.sched.host_ram = lambda: (lagging[0], lagging[1] - 4 * GIB)
        await w.clock.run(w.sched.keep_ram())  # the background duty, within FREED_GRACE_S
        assert [e for e in w.log if e.startswith("stop")] == ["stop a"]
    run(go())


def test_the_default_ram_budget_is_a_share_of_the_machine_less_other_programs():
    from mmlib.serve.scheduler import derived_ram_budget

    assert derived_ram_budget(32 * GIB, 20 * GIB, 4 * GIB) == int(0.8 * 32 * GIB) - 8 * GIB
    assert derived_ram_budget(32 * GIB, 2 * GIB, 0) == 0  # others hold more than the share: no sleepers


def test_the_awake_servers_ram_counts_against_the_budget_but_only_sleepers_give_way():
    """perf's offload = "fit" pins half of the spare RAM, awake or asleep: the budget is for all of mm."""
    async def go():
        w, card = checkpoint_world(FOUR, ram_budget_gib=14)  # three sleepers' 4 GiB fit beside nothing
        w.server("big").ram[State.AWAKE] = 6 * GIB
        await visit(w, "a", "b", "c", "big")  # 6 awake + 3 x 4 asleep > 14: a goes, once big is up
        await w.clock.advance(1)
        assert [e for e in w.log if e.startswith("stop")] == ["stop a"]
        assert (w.server("b").state, w.server("c").state, w.server("big").state) == \
            (State.ASLEEP, State.ASLEEP, State.AWAKE)
    run(go())


def test_a_failed_restore_is_a_cold_start_and_the_request_is_served(caplog):
    async def go():
        w, card = checkpoint_world(FOUR, ram_budget_gib=100)
        await visit(w, "a", "b", "c", "big")
        w.server("a").fails.add("restore")
        server = await w.clock.run(w.sched.acquire(w.profiles["a"]))
        assert server.state == State.AWAKE and server.in_flight == 1
        assert w.log[-3:] == ["restore a", "stop a", "start a"] and card.peak <= card.cap
        lines = [r.message for r in caplog.records if "restoring it from its checkpoint failed" in r.message]
        assert len(lines) == 1 and "starting it again" in lines[0]
    run(go())


def test_a_failed_checkpoint_stops_the_sleeper_and_the_switch_goes_on():
    async def go():
        w, card = checkpoint_world(FOUR, ram_budget_gib=100)
        w.server("a").fails.add("checkpoint")
        await visit(w, "a", "b", "c", "big")
        assert w.log[-3:] == ["checkpoint a", "stop a", "start big"] and w.server("big").state == State.AWAKE
    run(go())


def test_a_crash_while_checkpointed_starts_it_again_on_its_next_request():
    async def go():
        w, card = checkpoint_world(FOUR, ram_budget_gib=100)
        await visit(w, "a", "b", "c", "big")
        w.server("a").crash()
        await w.clock.advance(30)
        assert w.server("a").state == State.FAILED and w.log[-1] == "start big"  # not restarted for nobody
        server = await w.clock.run(w.sched.acquire(w.profiles["a"]))
        assert server.state == State.AWAKE and w.log[-1] == "start a" and card.peak <= card.cap
    run(go())


def test_a_paused_sleeper_checkpointed_keeps_its_requests():
    async def go():
        w, card = checkpoint_world({"a": (8, 1.5), "b": (8, 1.5), "big": (11, 1)}, ram_budget_gib=100)
        w.sched.policy = Policy(max_wait_s=0.05, pause_after_s=0.05, settle_timeout_s=1)
        w.server("a").can_pause_requests = True
        w.server("b").can_checkpoint = False
        await visit(w, "a")
        long_answer = await w.sched.acquire(w.profiles["a"])
        (await w.clock.run(w.sched.acquire(w.profiles["b"]))).release()  # a pauses its answer
        assert "sleep a keeping 1" in w.log
        await visit(w, "big")  # 11 + 1.5: b is stopped, then a, paused, leaves the card
        assert "stop b" in w.log and "checkpoint a" in w.log and "stop a" not in w.log
        await w.clock.advance(1)  # big idle: a comes back for its paused answer
        assert w.log[-2:] == ["restore a", "wake a"] and long_answer.state == State.AWAKE
        assert long_answer.in_flight == 1
        assert card.peak <= card.cap
    run(go())
