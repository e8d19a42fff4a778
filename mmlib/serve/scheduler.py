"""Which servers are awake: one place decides (Ollama's sched.go idea), under one lock.

A switch puts to sleep (or stops, where sleep mode is unavailable) every awake server whose memory
share does not fit beside the target, then wakes or starts the target. Requests that arrive during
a switch wait on the same activation instead of starting a second one.

Crashes come here too (a server's on_death): a server that crashed while serving is restarted by
its policy, after a backoff, through the same activation path as any start, so the switch lock and
memory rules hold for it; `mm stop` during the backoff cancels it. A server that crashed while
asleep is not brought back awake beside the active one: it starts again on its next request.

Memory is counted in bytes where the card answers (serve/memory.CardMemory): what each server
holds awake and asleep (measured over its process tree once it ran, predicted before), against the
card's capacity or the budget in config.toml. Servers that fit stay awake together; a target that
does not fit puts the others to sleep, then stops the least recently used sleepers, then waits until
the card shows the memory free. Without a GPU, declared shares (share_gpu) decide as before.

Under mixed traffic a switch is not made for every request of the other model: the awake model keeps
serving until the other model's oldest waiter has waited policy.max_wait_s, or the awake model has
nothing in flight (Policy). Then the requests in flight get policy.pause_after_s to finish; where
vLLM can keep them across a sleep (0.26+, mode=keep: preempted, recomputed on waking), those still
running then pause with their server, which comes back for them as it would for a waiting request.
No model starves, and no answer's length holds another model up: every waiter is served within
max_wait_s plus pause_after_s plus one switch (without pausing: max_wait_s plus the requests in
flight plus one switch). Short requests finish inside pause_after_s and are never paused: pausing
costs the paused answer a recompute and a second switch, worth it only against a long answer.

Servers, the profile loader, the card and the backoff sleep are injected: tests drive the real
scheduler with fake servers and a fake card (tests/unit/test_scheduler.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from mmlib.errors import MMError
from mmlib.profiles.profile import Profile, load_profile
from mmlib.serve.memory import Footprint, NoCard
from mmlib.serve.states import AWAKE_ISH, LIVE, State

log = logging.getLogger("mm.scheduler")

# Shares of one GPU's memory (vLLM's gpu_memory_utilization) that may be awake at once.
GPU_SHARE_LIMIT = 1.0
DRAIN_POLL_S = 0.002
HOLD_POLL_S = 0.005
SETTLE_POLL_S = 0.1
MEASURE_DELAY_S = 0.05


@dataclass(frozen=True)
class Policy:
    """How switches are made under mixed traffic (config.toml: switch_max_wait, switch_pause_in_flight,
    switch_pause_after)."""
    max_wait_s: float = 1.0  # the longest a request waits for its model while another one serves
    pause_in_flight: bool = True  # what still runs pause_after_s into a switch pauses (where vLLM can)
    pause_after_s: float = 5.0  # how long the answers in flight may hold a switch up before they pause
    settle_timeout_s: float = 30.0  # how long freed GPU memory may take to show as free


def fit_together(profiles: list[Profile]) -> bool:
    """One server has the GPU to itself unless every awake one declares a share and they fit."""
    if len(profiles) <= 1:
        return True
    return all(p.share_gpu for p in profiles) and \
        sum(p.memory_share for p in profiles) <= GPU_SHARE_LIMIT + 1e-9


def restart_backoff_s(restarts: int) -> float:
    """1 s, 2 s, 4 s ... up to 15 s before restart number `restarts` (1-based)."""
    return min(2 ** restarts, 30) * 0.5


@dataclass
class _Pending:
    since: float | None  # when its first request arrived; None for a command (no holding off)
    task: asyncio.Task | None = None
    requests: int = 0


class Scheduler:
    def __init__(self, make_server: Callable[[Profile], Any], load: Callable[[str], Profile] = load_profile,
                 drain_limit_s: float = 600.0, sleep: Callable[[float], Any] = asyncio.sleep,
                 memory: Any = None, policy: Policy = Policy(),
                 preflight: Callable[[Profile], Awaitable[None]] | None = None):
        self.servers: dict[str, Any] = {}
        self.active: list[str] = []  # profiles of the last activation, the target of model "default"
        self.last_switch_s: float | None = None
        self.drain_limit_s = drain_limit_s
        self.memory = memory or NoCard()
        self.policy = policy
        self.footprints: dict[tuple[str, str | None], Footprint] = {}  # (profile, model) -> measured
        self.switch_times: deque[float] = deque(maxlen=1000)
        self._make_server = make_server
        self._load = load
        self._sleep = sleep  # injectable: tests run backoffs without waiting
        # Checks a start must pass (guard rails, this machine); raises Refused before anything is slept
        # or stopped, so a request for a broken profile leaves what runs untouched.
        self._preflight = preflight
        self._switch = asyncio.Lock()
        self._pending: dict[tuple[str, ...], _Pending] = {}
        self._restarts: dict[str, asyncio.Task] = {}
        self.closed = False  # a daemon shutting down takes no new work
        self.on_switch: Callable[[list[str], list[str], float], None] = lambda before, after, s: None  # metrics

    # --- which servers ---------------------------------------------------------------------------------
    def members(self, profile: Profile) -> list[Profile]:
        if not profile.is_stack:
            return [profile]
        out = []
        for name in profile.stack:
            member = self._load(name)
            if member.is_stack:
                raise MMError(f"{profile.source}: stack: '{name}' is itself a stack (fix: list servers only)")
            out.append(member)
        return out

    def server_for(self, profile: Profile) -> Any:
        """The server of this profile, replaced by a fresh one if the profile changed while it was down."""
        server = self.servers.get(profile.name)
        if server is None or (server.state not in LIVE and server.profile != profile):
            server = self._make_server(profile)
            server.on_death = self.on_death
            self.servers[profile.name] = server
        return server

    def awake(self) -> list[Any]:
        return [s for s in self.servers.values() if s.state in AWAKE_ISH]

    def waiting(self, name: str) -> int:
        """Requests waiting for an activation that brings this server up."""
        return sum(p.requests for key, p in self._pending.items() if key[-1] == name)

    def _check_open(self) -> None:
        if self.closed:
            raise MMError("the mm daemon is shutting down; run the command again once it has stopped")

    # --- requests and commands -------------------------------------------------------------------------
    async def acquire(self, profile: Profile) -> Any:
        """A ready server of a (non-stack) profile with this request counted on it, so that no
        switch puts it to sleep before the request is answered. The caller must release() it."""
        self._check_open()
        server = self._ready_now(profile)
        if server is not None:
            server.in_flight += 1
            return server
        failed = self.servers.get(profile.name)
        if failed is not None and failed.state == State.FAILED and not failed.may_restart:
            # A crashed server is restarted by its policy, not by whoever asks next: say so at once.
            raise MMError(f"{profile.name} failed ({failed.error}); `mm up {profile.name}` starts it again")
        await self._check(profile)
        return (await self._join(profile, wants_request=True))[-1]

    async def activate(self, profile: Profile) -> list[Any]:
        """Make the profile's servers answer (for commands; requests use acquire). A command is
        the user asking again, so a failed server gets a fresh restart budget."""
        self._check_open()
        for member in self.members(profile):
            server = self.servers.get(member.name)
            if server is not None and server.state == State.FAILED:
                server.restarts = 0
        ready = self._ready_now_all(profile)
        if ready:
            return ready
        await self._check(profile)
        return await self._join(profile, wants_request=False)

    async def _check(self, profile: Profile) -> None:
        """The preflight of each member that is not running yet (raises Refused)."""
        if self._preflight is None:
            return
        for member in self.members(profile):
            server = self.servers.get(member.name)
            if server is None or server.state not in LIVE or server.profile != member:
                await self._preflight(member)

    def _ready_now_all(self, profile: Profile) -> list[Any] | None:
        # Only while no switch is under way or queued: a request for the current model must not
        # jump ahead of a switch that is waiting for that model's requests to finish.
        if self._switch.locked():
            return None
        members = self.members(profile)
        servers = [self.servers.get(m.name) for m in members]
        if all(s is not None and s.state == State.AWAKE and s.profile.model == m.model
               for s, m in zip(servers, members)) and self._fits_all():
            for s in servers:
                s.last_used = time.monotonic()
            return servers
        return None

    def _ready_now(self, profile: Profile) -> Any | None:
        servers = self._ready_now_all(profile)
        return servers[-1] if servers else None

    async def _join(self, profile: Profile, wants_request: bool) -> list[Any]:
        """Wait on the pending activation of this target, starting one if there is none.

        Requests that join are counted onto the server by the activation itself, at the instant it
        completes, so the next queued switch cannot put the server to sleep before they run."""
        key = tuple(m.name for m in self.members(profile))
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(since=time.monotonic() if wants_request else None)
            pending.task = asyncio.ensure_future(self._activate(profile, key, pending))
        elif not wants_request:
            pending.since = None  # a command does not wait for a slice to end
        if wants_request:
            pending.requests += 1
        try:
            return await asyncio.shield(pending.task)
        except asyncio.CancelledError:
            # The caller gave up (its client left): its place must not stay counted.
            if wants_request and not pending.task.done():
                pending.requests -= 1
            elif wants_request and not pending.task.cancelled() and pending.task.exception() is None:
                pending.task.result()[-1].release()
            raise

    def _fits_all(self) -> bool:
        awake = [s.profile for s in self.awake()]
        return len(awake) <= 1 or self._fits([], awake, [])

    async def _activate(self, profile: Profile, key: tuple[str, ...], pending: _Pending) -> list[Any]:
        try:
            await self._hold_off(pending, self.members(profile))
        except BaseException:
            self._pending.pop(key, None)
            raise
        async with self._switch:
            try:
                targets = await self._switch_to(profile)
            finally:
                self._pending.pop(key)
            # Still under the lock: the waiting requests hold their places before the next switch.
            targets[-1].in_flight += pending.requests
            return targets

    async def _hold_off(self, pending: _Pending, members: list[Profile]) -> None:
        """Let the awake model serve on while this switch may wait: until the first waiter has waited
        max_wait_s, or the servers the switch would put to sleep have nothing in flight."""
        names = {m.name for m in members}
        while pending.since is not None:
            if self._switch.locked() and time.monotonic() - pending.since < self.policy.max_wait_s:
                # A switch under way: judge what it leaves awake. (Queued at once, a waiter that
                # came during a switch took the card back the moment it ended: under steady mixed
                # traffic every phase was one batch and a switch.)
                await asyncio.sleep(HOLD_POLL_S)
                continue
            conflicting = [s for s in self.awake() if s.name not in names]
            if not conflicting or all(s.in_flight == 0 for s in conflicting) \
                    or time.monotonic() - pending.since >= self.policy.max_wait_s \
                    or self._fits(members, [s.profile for s in conflicting], self._asleep_profiles(names)):
                return
            await asyncio.sleep(HOLD_POLL_S)

    # --- memory ----------------------------------------------------------------------------------------
    def footprint(self, profile: Profile) -> Footprint | None:
        """Measured where this profile's model ran before, else predicted; None where unknown (no GPU)."""
        return self.footprints.get((profile.name, profile.model)) or self.memory.predict(profile)

    def _asleep_profiles(self, exclude: set[str]) -> list[Profile]:
        return [s.profile for s in self.servers.values()
                if s.state in (State.ASLEEP, State.FALLING_ASLEEP) and s.name not in exclude]

    def _awake_bytes(self, profile: Profile, starting: bool) -> int:
        """What the profile holds awake; for a start, its peak. NVML shows a server only at rest
        once it serves, but its start holds more (torch.compile's first runs, the warm-up): the
        estimate models that peak, so a start counts the larger of the two. (A measured 7B at rest
        let a sleeper's 0.9 GiB stay beside its restart, which then ran out of memory: card12 run2.)"""
        fp = self.footprint(profile)
        if not starting:
            return fp.awake
        predicted = self.memory.predict(profile)
        return max(fp.awake, predicted.awake if predicted else 0)

    def _fits(self, targets: list[Profile], awake: list[Profile], asleep: list[Profile],
              starting: frozenset[str] = frozenset()) -> bool:
        """Whether targets can be awake beside `awake` servers and `asleep` ones' residue (the
        targets named in `starting` start rather than wake: their peak counts)."""
        capacity = self.memory.capacity()
        prints = {p.name: self.footprint(p) for p in [*targets, *awake, *asleep]}
        if capacity is None or any(f is None for f in prints.values()):
            return fit_together([*targets, *awake])  # no card to ask: declared shares decide
        need = (sum(self._awake_bytes(p, p.name in starting) for p in targets)
                + sum(prints[p.name].awake for p in awake) + sum(prints[p.name].asleep for p in asleep))
        return need <= capacity

    def measure(self, server: Any) -> None:
        """Record what the server holds now (awake or asleep), keeping the awake peak."""
        held = self.memory.held(server.pid) if server.pid else None
        if held is None or server.state not in (State.AWAKE, State.ASLEEP):
            return
        key = (server.name, server.profile.model)
        old = self.footprints.get(key)
        guess = self.memory.predict(server.profile) or Footprint(awake=held, asleep=held)
        fp = old if old is not None and old.measured else Footprint(guess.awake, guess.asleep, measured=True)
        if server.state == State.AWAKE:
            fp.awake = max(fp.awake, held) if old is not None and old.measured else held
        else:
            fp.asleep = held
        self.footprints[key] = fp

    def _measure_soon(self, server: Any) -> None:
        """Measure once the switch's waiters run: walking a process tree and asking NVML takes
        milliseconds that a switch should not wait for."""
        asyncio.get_running_loop().call_later(MEASURE_DELAY_S, self.measure, server)

    async def _await_room(self, need: int) -> None:
        """Until the card shows `need` bytes free (a stopped or sleeping vLLM lets go of its memory
        a moment after its request returns), at most policy.settle_timeout_s."""
        deadline = time.monotonic() + self.policy.settle_timeout_s
        while time.monotonic() < deadline:
            free = self.memory.free()
            if free is None or free >= need:
                return
            await asyncio.sleep(SETTLE_POLL_S)
        log.warning("only %s bytes free after %.0f s, %s wanted; starting anyway", self.memory.free(),
                    self.policy.settle_timeout_s, need)

    async def _stop_released(self, server: Any) -> None:
        """Stop a server and return once the card shows its memory free again."""
        before, fp = self.memory.free(), self.footprint(server.profile)
        held = None
        if fp and server.state in LIVE and server.pid:
            held = fp.asleep if server.state == State.ASLEEP else fp.awake
        await server.stop()
        if before is not None and held:
            await self._await_room(before + int(held * 0.9))

    def _room_needed(self, targets: list[Any]) -> int:
        """Bytes that must be free before the targets wake or start."""
        need = 0
        for t in targets:
            fp = self.footprint(t.profile)
            if fp is None or t.state == State.AWAKE:
                continue
            need += (fp.awake - fp.asleep if t.state == State.ASLEEP
                     else self._awake_bytes(t.profile, starting=True))
        return need

    # --- the switch ------------------------------------------------------------------------------------
    async def _switch_to(self, profile: Profile) -> list[Any]:
        t0 = time.perf_counter()
        awake_before = [s.name for s in self.awake()]  # metrics (issue 14)
        for m in self.members(profile):  # `mm chat OTHER/MODEL` on a running profile: a new server
            old = self.servers.get(m.name)
            if old is not None and old.state in LIVE and old.profile.model != m.model:
                await self._drain(old)
                await old.stop()
        targets = [self.server_for(m) for m in self.members(profile)]
        if not fit_together([t.profile for t in targets]):
            budget = sum(t.profile.memory_share for t in targets)
            raise MMError(f"{profile.source}: stack: its servers cannot be awake together (shares add "
                          f"up to {budget:.2f}; fix: set share_gpu = true in each member profile and "
                          f"engine.gpu_memory_utilization values that add up to at most 1)")
        await self._make_room(targets)
        for t in targets:  # one at a time: vLLM checks free GPU memory when it starts
            self._cancel_restart(t.name)
            await self._await_room(self._room_needed([t]))
            await t.wake()
            self._measure_soon(t)
        took = time.perf_counter() - t0
        for t in targets:
            t.last_switch_s = took
        self.last_switch_s = took
        self.switch_times.append(time.monotonic())
        self.active = [t.name for t in targets]
        self.on_switch(awake_before, self.active, took)  # metrics (issue 14)
        return targets

    async def _make_room(self, targets: list[Any]) -> None:
        """Others stay awake where everything fits; else they sleep; then the least recently used
        sleepers stop until the targets fit beside what is left."""
        names = {t.name for t in targets}
        tp = [t.profile for t in targets]
        starting = frozenset(t.name for t in targets if t.state not in LIVE)
        others = [s for s in self.awake() if s.name not in names]
        if not self._fits(tp, [s.profile for s in others], self._asleep_profiles(names), starting):
            await asyncio.gather(*(self._drain_then_sleep(s) for s in others))
            for s in others:
                self._measure_soon(s)
        # Sleepers holding paused requests go last: stopping one ends its requests.
        sleepers = sorted((s for s in self.servers.values() if s.state == State.ASLEEP and s.name not in names),
                          key=lambda s: (s.in_flight > 0, s.last_used))
        for s in sleepers:
            if self._fits(tp, [a.profile for a in self.awake() if a.name not in names],
                          self._asleep_profiles(names), starting):
                break
            log.info("stopping %s (asleep, least recently used) to make room for %s", s.name, ", ".join(names))
            await self._stop_released(s)

    async def _drain(self, server: Any, limit_s: float | None = None) -> None:
        """Requests already on a server finish before it sleeps; none is cut off by a switch. The
        wait ends early when the server stops serving (it crashed), and at limit_s (default
        drain_limit_s; the proxy's upstream timeout bounds each request as well)."""
        deadline = time.monotonic() + (self.drain_limit_s if limit_s is None else limit_s)
        while server.in_flight > 0 and server.state == State.AWAKE and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    async def _drain_then_sleep(self, server: Any) -> None:
        """For a switch: the requests in flight get pause_after_s to finish where the server can
        pause them (what still runs then pauses, and the server comes back for it); else all the
        time they take."""
        pause = self.policy.pause_in_flight and getattr(server, "can_pause_requests", False)
        await self._drain(server, self.policy.pause_after_s if pause else None)
        if not (pause and server.in_flight > 0 and server.state == State.AWAKE):
            await server.sleep()
            return
        log.info("%s: %d request(s) still running pause until it is back", server.name, server.in_flight)
        await server.sleep(keep_requests=True)
        if server.state == State.ASLEEP:
            self._come_back_for(server)

    def _come_back_for(self, server: Any) -> None:
        """Requests paused in a sleeping server wait like a request for it: an activation with its
        hold-off, so they go on within max_wait_s plus a switch once the switch that paused them ends."""
        key = tuple(m.name for m in self.members(server.profile))
        if key in self._pending:
            return  # requests already wait for it: their activation brings it back
        pending = self._pending[key] = _Pending(since=time.monotonic())
        pending.task = asyncio.ensure_future(self._activate(server.profile, key, pending))

        def done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s: bringing it back for its paused requests failed: %s", server.name,
                            task.exception())
        pending.task.add_done_callback(done)

    def switches_per_minute(self) -> int:
        now = time.monotonic()
        return sum(1 for t in self.switch_times if now - t <= 60)

    # --- commands: sleep, stop ---------------------------------------------------------------------------
    async def sleep(self, name: str | None = None, level: int | None = None) -> None:
        """Put one server (or every awake one) to sleep, after the requests counted on it finish."""
        servers = [self.servers[name]] if name else list(self.servers.values())
        async with self._switch:
            await asyncio.gather(*(self._drain_then_sleep_at(s, level) for s in servers
                                   if s.state == State.AWAKE))
            for s in servers:
                self.measure(s)
        self.active = [n for n in self.active if self.servers[n].state == State.AWAKE]

    async def _drain_then_sleep_at(self, server: Any, level: int | None) -> None:
        await self._drain(server)
        await server.sleep(level)

    async def stop(self, name: str | None = None) -> list[str]:
        """Stop one server (or all). Not under the switch lock: a server that is loading is
        cancelled at once instead of waiting for the switch that started it."""
        servers = [self.servers[name]] if name else list(self.servers.values())
        for s in servers:
            self._cancel_restart(s.name)
            for key, pending in list(self._pending.items()):
                if key[-1] == s.name and pending.requests == 0 and pending.since is not None:
                    pending.task.cancel()  # it came back for paused requests, which the stop ends
        await asyncio.gather(*(self._stop_released(s) for s in servers))
        self.active = [n for n in self.active if self.servers[n].state == State.AWAKE]
        return [s.name for s in servers]

    async def close(self) -> None:
        """Shutdown: refuse new work, cancel restarts and starts, stop every server."""
        self.closed = True
        for task in self._pending.values():
            task.task.cancel()
        await self.stop()

    # --- crashes -----------------------------------------------------------------------------------------
    def on_death(self, server: Any, was: State) -> None:
        self.active = [n for n in self.active if n != server.name]
        if self.closed or was not in AWAKE_ISH or not server.may_restart:
            # Asleep when it died: it starts again on its next request, not beside the active one.
            return
        server.restarts += 1
        delay = restart_backoff_s(server.restarts)
        log.info("%s died; restarting in %.1f s (restart %d of %d)", server.name, delay, server.restarts,
                 server.profile.max_restarts)
        self._cancel_restart(server.name)
        self._restarts[server.name] = asyncio.ensure_future(self._restart_after(server, delay))

    async def _restart_after(self, server: Any, delay: float) -> None:
        await self._sleep(delay)
        self._restarts.pop(server.name, None)
        if self.closed or server.state != State.FAILED or self.servers.get(server.name) is not server:
            return  # stopped, restarted by a request, or replaced meanwhile
        try:
            await self._join(server.profile, wants_request=False)
        except MMError as e:
            log.warning("%s: restart failed: %s", server.name, str(e).splitlines()[0])

    def _cancel_restart(self, name: str) -> None:
        task = self._restarts.pop(name, None)
        if task is not None and asyncio.current_task() is not task:
            task.cancel()
