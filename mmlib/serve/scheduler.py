"""Which servers are awake: one loop decides (Ollama's sched.go idea).

Every change to a server's life goes through the scheduler's loop: a request or a command for a
server that is not ready joins a pending activation (one per target), and the loop runs the
activations one at a time, each when its hold-off ends. An activation belongs to the loop, never to
the request that asked for it: requests wait on it and may leave, and when the last one leaves before
it runs, it is dropped. A switch puts to sleep (or stops, where sleep mode is unavailable) every awake
server whose memory share does not fit beside the target, then wakes or starts the target. `mm stop`
is not queued behind a switch: it cancels a start under way at once.

Crashes come here too (a server's on_death): a server that crashed while serving is restarted by
its policy, after a backoff, through the same loop as any start, so the memory rules hold for it;
`mm stop` during the backoff cancels it. A server that crashed while asleep is not brought back awake
beside the active one: it starts again on its next request. A start that fails spends the same kind of
budget (supervisor's BACKOFF, then FATAL after max_restarts): until its backoff ends a request for it
is answered at once, and nothing is slept for it; a command (`mm up`) resets the budget.

Memory is counted in bytes where the card answers (serve/memory.CardMemory): what each server
holds awake and asleep (measured over its process tree once it ran, predicted before), against the
card's capacity or the budget in config.toml. Servers that fit stay awake together; a target that
does not fit puts the others to sleep, then moves the least recently used sleepers off the card
(checkpointed into RAM by the CUDA driver where the server can be, else stopped; lazily: a sleeper
keeps its residue while everything fits), then waits until the card shows the memory free. A
checkpointed server holds no GPU memory; its wake restores it (while the switch makes the rest of the
room, where its residue fits meanwhile), and a failed restore is a cold start.
Without a GPU, declared shares (share_gpu) decide as before. On a machine of several cards each
server has its own (serve/cards.py: the profile's, else the least used): servers on different cards
never put each other to sleep, and where cards are shared these rules hold on each of them.

Sleepers hold RAM (the weights a sleep moved off the card, checkpoints): what mm's servers hold
together, awake and asleep, stays under the RAM budget (config.toml ram_budget, else
derived_ram_budget), the least recently used sleepers stopped to keep it so; and while the machine's
free RAM is under ram_floor sleepers are stopped too, so it never swaps. An awake server's RAM counts
(perf's pinned KV offload is RAM whether it is awake or asleep), but only sleepers give way.

Under mixed traffic a switch is not made for every request of the other model: the awake model keeps
serving until the other model's oldest waiter has waited policy.max_wait_s, or the awake model has
nothing in flight (Policy). Then the requests in flight get policy.pause_after_s to finish; where
vLLM can keep them across a sleep (0.26+, mode=keep: preempted, recomputed on waking), those still
running then pause with their server, which comes back for them as it would for a waiting request
(unless every paused request has gone by then). No model starves, and no answer's length holds
another model up: every waiter is served within max_wait_s plus pause_after_s plus one switch
(without pausing: max_wait_s plus the requests in flight plus one switch). Short requests finish
inside pause_after_s and are never paused: pausing costs the paused answer a recompute and a second
switch, worth it only against a long answer.

Servers, the profile loader, the card and the clock are injected: tests drive the real scheduler with
fake servers, a fake card and a clock they advance (tests/unit/test_scheduler.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from mmlib.errors import MMError
from mmlib.guard.fit import Footprint
from mmlib.profiles.profile import Profile, load_profile
from mmlib.serve import cards as placing
from mmlib.serve.memory import NoCard
from mmlib.serve.states import AWAKE_ISH, LIVE, State
from mmlib.system.clock import Clock
from mmlib.system.nvml import GIB

log = logging.getLogger("mm.scheduler")

# Shares of one GPU's memory (vLLM's gpu_memory_utilization) that may be awake at once.
GPU_SHARE_LIMIT = 1.0
SETTLE_POLL_S = 0.1  # the card is asked (NVML) this often while freed memory settles
MEASURE_DELAY_S = 0.05
RAM_AFTER_SWITCH_S = 1.0  # a switch's RAM is judged this long after it (its first tokens stream first)
# Without a ram_budget in config.toml, mm's servers (awake and asleep) may hold this share of the
# machine's RAM, less what other programs hold; and whatever the budget, sleepers stop while free RAM
# is under the floor. (0.6 for the sleepers alone was too little on the H200 rotation12 run: perf's
# offload = "fit" pins half of the spare RAM, and the awake server's share went uncounted.)
RAM_SHARE = 0.8
# A stopped server's RAM shows as available only a moment later (seconds for tens of GiB): meanwhile
# it counts as freed, or the next judgment (the budget derived from what others seem to hold, the
# floor) would stop more sleepers for memory already on its way back (the H100 rotation12 run).
FREED_GRACE_S = 10.0
# Free bytes left beside a target restored early (_restore_early), over its residue: slack for what
# the awake servers' allocators may still take while they finish their requests.
RESTORE_EARLY_MARGIN = 512 << 20
SLEEPING = frozenset({State.ASLEEP, State.CHECKPOINTED})  # sleepers: on the card, or off it in RAM


def ram_floor(total: int) -> int:
    """Free RAM below which sleepers are stopped, so the machine never swaps."""
    return max(512 << 20, total // 20)


def derived_ram_budget(total: int, available: int, held_by_mm: int) -> int:
    """RAM_SHARE of the machine's RAM less what other programs hold now."""
    others = max(0, total - available - held_by_mm)
    return max(0, int(total * RAM_SHARE) - others)


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
class _Activation:
    """One target the loop will bring up; requests and commands for it join it."""
    key: tuple[str, ...]
    profile: Profile
    members: list[Profile]
    since: float | None  # when its first request arrived; None for a command (no holding off)
    seq: int
    done: asyncio.Future
    requests: int = 0
    paused_for: Any = None  # the sleeping server whose paused requests it brings back
    running: bool = False

    @property
    def wanted(self) -> bool:
        """Whether anyone still waits for it (a come-back is wanted while its paused requests last)."""
        if self.since is None or self.requests > 0:
            return True
        s = self.paused_for
        return s is not None and s.in_flight > 0 and s.state in SLEEPING


@dataclass
class _StartFailures:
    """Failed starts of one profile: the backoff before the next try, FATAL past max_restarts."""
    profile: Profile
    count: int = 0
    retry_at: float = 0.0
    error: str = ""

    @property
    def fatal(self) -> bool:
        return self.count > self.profile.max_restarts


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class Scheduler:
    def __init__(self, make_server: Callable[[Profile], Any], load: Callable[[str], Profile] = load_profile,
                 drain_limit_s: float = 600.0, memory: Any = None, policy: Policy = Policy(),
                 preflight: Callable[[Profile], Awaitable[None]] | None = None, clock: Any = None,
                 ram_budget: int | None = None, host_ram: Callable[[], tuple[int, int] | None] | None = None):
        self.servers: dict[str, Any] = {}
        self.active: list[str] = []  # profiles of the last activation, the target of model "default"
        self.last_switch_s: float | None = None
        self.drain_limit_s = drain_limit_s
        self.memory = memory or NoCard()
        self.policy = policy
        self.clock = clock or Clock()  # now() and sleep(): tests advance a fake one
        self.ram_budget = ram_budget  # bytes mm's servers may hold in RAM; None: derived_ram_budget
        self._freed: list[tuple[float, int]] = []  # (when, bytes of RAM) of servers stopped lately
        self.host_ram = host_ram  # () -> (total, available) bytes of the machine's RAM; None: unknown
        # (profile, model, its sizing digest) -> measured
        self.footprints: dict[tuple[str, str | None, str], Footprint] = {}
        self._placing: dict[str, tuple[int, ...] | None] = {}  # the cards of the switch's starts (cards_of)
        self.switch_times: deque[float] = deque(maxlen=1000)
        self._make_server = make_server
        self._load = load
        # Checks a start must pass (guard rails, this machine); raises Refused before anything is slept
        # or stopped, so a request for a broken profile leaves what runs untouched.
        self._preflight = preflight
        self._pending: dict[tuple[str, ...], _Activation] = {}
        self._jobs: list[tuple[int, Callable[[], Awaitable[Any]], asyncio.Future]] = []  # commands' sleeps
        self._seq = itertools.count()
        self._busy = False  # the loop is running an activation or a job
        self._loop: asyncio.Task | None = None
        self._changed = asyncio.Event()  # set (and replaced) on every change the loop may wait for
        self._restarts: dict[str, asyncio.Task] = {}
        self._failures: dict[str, _StartFailures] = {}
        self._background: set[asyncio.Task] = set()
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
            server = self.adopt(self._make_server(profile))
        return server

    def adopt(self, server: Any) -> Any:
        """Take a server into the scheduler's care: its deaths come here, and each request's release
        reaches the loop (a drain or a paused server's come-back waits on it)."""
        server.on_death = self.on_death
        server.on_release = self._on_release
        self.servers[server.name] = server
        return server

    def _on_release(self, server: Any) -> None:
        self._kick()

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
        self._refuse_in_backoff(profile)
        await self._check(profile)
        return (await self._join(profile, wants_request=True))[-1]

    async def activate(self, profile: Profile) -> list[Any]:
        """Make the profile's servers answer (for commands; requests use acquire). A command is
        the user asking again, so a failed server gets a fresh restart budget."""
        self._check_open()
        for member in self.members(profile):
            self._failures.pop(member.name, None)
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
        # Only while the loop runs nothing: a request for the current model must not jump ahead of a
        # switch that is waiting for that model's requests to finish.
        if self._busy:
            return None
        members = self.members(profile)
        servers = [self.servers.get(m.name) for m in members]
        if all(s is not None and s.state == State.AWAKE and s.profile.model == m.model
               for s, m in zip(servers, members)) and self._fits_all():
            for s in servers:
                s.last_used = self.clock.now()
            return servers
        return None

    def _ready_now(self, profile: Profile) -> Any | None:
        servers = self._ready_now_all(profile)
        return servers[-1] if servers else None

    async def _join(self, profile: Profile, wants_request: bool) -> list[Any]:
        """Wait on the pending activation of this target, queueing one if there is none.

        Requests that join are counted onto the server by the activation itself, at the instant it
        completes, so the next switch cannot put the server to sleep before they run."""
        members = self.members(profile)
        key = tuple(m.name for m in members)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._queue(profile, members, self.clock.now() if wants_request else None)
        elif not wants_request:
            pending.since = None  # a command does not wait for a slice to end
        if wants_request:
            pending.requests += 1
        self._kick()
        try:
            return await asyncio.shield(pending.done)
        except asyncio.CancelledError:
            # The caller gave up (its client left): its place must not stay counted.
            if wants_request and not pending.done.done():
                pending.requests -= 1
                self._kick()  # nobody left: the loop drops it
            elif wants_request and not pending.done.cancelled() and pending.done.exception() is None:
                pending.done.result()[-1].release()
            raise

    def _queue(self, profile: Profile, members: list[Profile], since: float | None,
               paused_for: Any = None) -> _Activation:
        done = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may be waiting
        pending = _Activation(tuple(m.name for m in members), profile, members, since, next(self._seq),
                              done, paused_for=paused_for)
        self._pending[pending.key] = pending
        self._ensure_loop()
        return pending

    def _fits_all(self) -> bool:
        awake = [s.profile for s in self.awake()]
        return len(awake) <= 1 or self._fits([], awake, [])

    # --- start failures: backoff, then FATAL ---------------------------------------------------------------
    def _refuse_in_backoff(self, profile: Profile) -> None:
        """A request for a profile whose start keeps failing is answered at once: no sleep for it."""
        for member in self.members(profile):
            f = self._failures.get(member.name)
            if f is None or f.profile != member:
                continue  # never failed, or changed since (a fix gets its try at once)
            if f.fatal:
                raise MMError(f"{member.name} failed to start {f.count} times ({f.error}); "
                              f"`mm up {member.name}` tries again")
            wait = f.retry_at - self.clock.now()
            if wait > 0:
                error = MMError(f"{member.name} failed to start ({f.error}); next try in {math.ceil(wait)} s "
                                f"(`mm up {member.name}` tries now)")
                error.retry_after_s = math.ceil(wait)  # for the proxy's Retry-After
                raise error

    def _start_failed(self, server: Any, error: BaseException) -> None:
        f = self._failures.get(server.name)
        if f is None or f.profile != server.profile:
            f = self._failures[server.name] = _StartFailures(server.profile)
        f.count += 1
        f.error = _first_line(error)
        f.retry_at = self.clock.now() + restart_backoff_s(f.count)
        log.warning("%s: start %d failed (%s); %s", server.name, f.count, f.error,
                    "no more tries until `mm up`" if f.fatal else
                    f"a request may try again in {restart_backoff_s(f.count):.0f} s")

    def start_status(self, name: str) -> dict[str, Any]:
        """For status: failed starts in a row and when the next try may come (None: none due, or FATAL)."""
        f = self._failures.get(name)
        if f is None:
            return {"failed_starts": 0, "retry_in_s": None, "start_fatal": False}
        wait = max(0.0, f.retry_at - self.clock.now())
        return {"failed_starts": f.count, "retry_in_s": None if f.fatal else round(wait, 1),
                "start_fatal": f.fatal, "start_error": f.error}

    # --- the loop ----------------------------------------------------------------------------------------
    def _kick(self) -> None:
        """Something the loop (or a drain) may wait for changed: look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until_change(self, deadline: float | None = None) -> None:
        """Until the next kick, or the deadline on the clock."""
        waits = [asyncio.ensure_future(self._changed.wait())]
        if deadline is not None:
            waits.append(asyncio.ensure_future(self.clock.sleep(max(0.0, deadline - self.clock.now()))))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _ensure_loop(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except Exception:  # a bug here must not leave every later request waiting forever
                log.exception("the scheduler's loop failed; going on")
                await self._until_change(self.clock.now() + 1.0)

    async def _step(self) -> None:
        self._drop_unwanted()
        job = self._next_job()
        if job is not None:
            await self._run_job(*job)
            return
        pending = self._next_activation()
        if pending is not None:
            await self._run_activation(pending)
            return
        await self._until_change(self._next_deadline())

    def _drop_unwanted(self) -> None:
        """Activations nobody waits for any more are dropped before they run (a start for nobody)."""
        for key, pending in list(self._pending.items()):
            if not pending.running and not pending.wanted:
                self._discard(pending)

    def _discard(self, pending: _Activation) -> None:
        if self._pending.get(pending.key) is pending:
            del self._pending[pending.key]
        if not pending.done.done():
            pending.done.cancel()

    def _next_job(self):
        return self._jobs.pop(0) if self._jobs else None

    def _next_activation(self) -> _Activation | None:
        ready = [p for p in self._pending.values() if not self._held_off_or_broken(p)]
        return min(ready, key=lambda p: p.seq) if ready else None

    def _held_off_or_broken(self, pending: _Activation) -> bool:
        try:
            return self._held_off(pending)
        except Exception:  # the fit cannot be judged (a profile or estimate broke): its switch says why
            log.exception("%s: judging the hold-off failed", pending.key[-1])
            return False

    def _next_deadline(self) -> float | None:
        held = [p.since + self.policy.max_wait_s for p in self._pending.values() if p.since is not None]
        return min(held) if held else None

    def _held_off(self, pending: _Activation) -> bool:
        """Whether the awake model serves on while this switch waits: until its first waiter has waited
        max_wait_s, or the servers it would put to sleep have nothing in flight."""
        if pending.since is None:
            return False
        names = set(pending.key)
        conflicting = [s for s in self.awake() if s.name not in names]
        return not (not conflicting or all(s.in_flight == 0 for s in conflicting)
                    or self.clock.now() >= pending.since + self.policy.max_wait_s  # as _next_deadline
                    or self._fits(pending.members, [s.profile for s in conflicting],
                                  self._asleep_profiles(names)))

    async def _run_activation(self, pending: _Activation) -> None:
        pending.running, self._busy = True, True
        try:
            targets = await self._switch_to(pending.profile)
        except asyncio.CancelledError:
            pending.done.cancel()
            raise
        except Exception as e:
            pending.done.set_exception(e)
            if pending.paused_for is not None and pending.requests == 0:
                log.warning("%s: bringing it back for its paused requests failed: %s", pending.key[-1],
                            _first_line(e))
        else:
            # The waiting requests hold their places before the loop looks at the next switch.
            targets[-1].in_flight += pending.requests
            pending.done.set_result(targets)
        finally:
            if self._pending.get(pending.key) is pending:
                del self._pending[pending.key]
            self._busy = False
            self._kick()

    async def _run_job(self, seq: int, job: Callable[[], Awaitable[Any]], done: asyncio.Future) -> None:
        self._busy = True
        try:
            done.set_result(await job())
        except asyncio.CancelledError:
            done.cancel()
            raise
        except Exception as e:
            done.set_exception(e)
        finally:
            self._busy = False
            self._kick()

    async def _in_loop(self, job: Callable[[], Awaitable[Any]]) -> Any:
        """Run a command's change (a sleep) in the loop, between switches."""
        done = asyncio.get_running_loop().create_future()
        self._jobs.append((next(self._seq), job, done))
        self._ensure_loop()
        self._kick()
        return await asyncio.shield(done)

    def _later(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- memory ----------------------------------------------------------------------------------------
    def footprint(self, profile: Profile) -> Footprint | None:
        """Measured where this profile's model ran before, else predicted; None where unknown (no GPU)."""
        return self.footprints.get((profile.name, profile.model, profile.sizing)) or self.memory.predict(profile)

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
        where = {p.name: self.cards_of(p) for p in [*targets, *awake, *asleep]}
        for card in placing.judged(where[p.name] for p in (targets or awake)):  # each card the targets use
            need = (sum(self._awake_bytes(p, p.name in starting) for p in targets if placing.on(card, where[p.name]))
                    + sum(prints[p.name].awake for p in awake if placing.on(card, where[p.name]))
                    + sum(prints[p.name].asleep for p in asleep if placing.on(card, where[p.name])))
            if need > capacity:
                return False
        return True

    # --- cards: where a server runs on a machine of several GPUs (serve/cards.py) -------------------------
    def cards_of(self, profile: Profile) -> tuple[int, ...] | None:
        """The cards a profile's server holds, or would get if it started now; None: none known."""
        server, visible = self.servers.get(profile.name), self.memory.cards()
        if profile.name in self._placing and (server is None or server.state not in LIVE):
            return self._placing[profile.name]  # placed by the switch under way
        if server is not None and server.state in LIVE:
            held = getattr(server, "gpus", None)  # None: started without a card named, CUDA's first
            return held if held is not None or not visible else tuple(visible[:1])
        return placing.place(profile, visible, self._card_load(exclude=profile.name))

    def _card_load(self, exclude: str) -> dict[int, int]:
        """Bytes the live servers (but `exclude`) hold on each card, as their footprints say."""
        load: dict[int, int] = {}
        for s in self.servers.values():
            if s.name == exclude or (s.state not in LIVE and s.name not in self._placing):
                continue  # (a start placed earlier in this switch counts: a stack's members spread out)
            fp = self.footprint(s.profile)
            held = (0 if s.state == State.CHECKPOINTED else fp.asleep if s.state == State.ASLEEP
                    else fp.awake) if fp else 1
            for c in self.cards_of(s.profile) or ():
                load[c] = load.get(c, 0) + held
        return load

    def _shares_card(self, profile: Profile, targets: list[Profile]) -> bool:
        mine = self.cards_of(profile)
        return any(placing.share(mine, self.cards_of(t)) for t in targets)

    def _cards_held(self, server: Any) -> tuple[int, ...] | None:
        return getattr(server, "gpus", None)

    def measure(self, server: Any) -> None:
        """Record what the server holds now (awake or asleep), keeping the awake peak."""
        held = self.memory.held(server.pid) if server.pid else None
        if held is None or server.state not in (State.AWAKE, State.ASLEEP):
            return
        key = (server.name, server.profile.model, server.profile.sizing)
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
        async def later() -> None:
            await self.clock.sleep(MEASURE_DELAY_S)
            self.measure(server)
        self._later(later())

    async def _await_room(self, need: int, cards: tuple[int, ...] | None = None) -> None:
        """Until the card (each of `cards`) shows `need` bytes free (a stopped or sleeping vLLM lets
        go of its memory a moment after its request returns), at most policy.settle_timeout_s."""
        deadline = self.clock.now() + self.policy.settle_timeout_s
        while self.clock.now() < deadline:
            free = self.memory.free(cards) if cards else self.memory.free()
            if free is None or free >= need:
                return
            await self.clock.sleep(SETTLE_POLL_S)
        log.warning("only %s bytes free after %.0f s, %s wanted; starting anyway", self.memory.free(),
                    self.policy.settle_timeout_s, need)

    async def _stop_released(self, server: Any) -> None:
        """Stop a server and return once the card shows its memory free again."""
        cards = self._cards_held(server)
        before, fp = self.memory.free(cards) if cards else self.memory.free(), self.footprint(server.profile)
        held = None
        if fp and server.state in LIVE and server.state != State.CHECKPOINTED and server.pid:
            held = fp.asleep if server.state == State.ASLEEP else fp.awake
        ram = self._host_bytes(server) if server.state in LIVE else 0
        await server.stop()
        if ram:
            self._freed.append((self.clock.now(), ram))
        if before is not None and held:
            await self._await_room(before + int(held * 0.9), cards)

    def _room_needed(self, targets: list[Any]) -> int:
        """Bytes that must be free before the targets wake or start."""
        need = 0
        for t in targets:
            fp = self.footprint(t.profile)
            if fp is None or t.state == State.AWAKE:
                continue
            need += (fp.awake - fp.asleep if t.state == State.ASLEEP
                     else fp.awake if t.state == State.CHECKPOINTED  # restored: what it held, nothing more
                     else self._awake_bytes(t.profile, starting=True))
        return need

    # --- the switch ------------------------------------------------------------------------------------
    async def _switch_to(self, profile: Profile) -> list[Any]:
        t0 = self.clock.now()
        awake_before = [s.name for s in self.awake()]  # metrics (issue 14)
        for m in self.members(profile):  # `mm chat OTHER/MODEL` on a running profile: a new server
            old = self.servers.get(m.name)
            if old is not None and old.state in LIVE and old.profile.model != m.model:
                await self._drain(old)
                await old.stop()
        targets = [self.server_for(m) for m in self.members(profile)]
        self._placing = {}
        for t in targets:  # a start gets its cards now, kept while the switch makes room for it
            if t.state not in LIVE and self.memory.cards():
                t.gpus = self._placing[t.name] = self.cards_of(t.profile)
        if not fit_together([t.profile for t in targets]):
            budget = sum(t.profile.memory_share for t in targets)
            raise MMError(f"{profile.source}: stack: its servers cannot be awake together (shares add "
                          f"up to {budget:.2f}; fix: set share_gpu = true in each member profile and "
                          f"engine.gpu_memory_utilization values that add up to at most 1)")
        await self._make_room(targets)
        waking = [t for t in targets if t.state in SLEEPING]
        if len(waking) > 1:  # a stack's sleepers wake together (a wake checks no free memory, and a
            for t in waking:  # restore took 0.8-1.2 s on the H100: voice's two in a row, twice that)
                self._cancel_restart(t.name)
            held = [self._cards_held(t) for t in waking]
            cards = None if any(c is None for c in held) else tuple(sorted({i for c in held for i in c}))
            await self._await_room(self._room_needed(waking), cards)
            await asyncio.gather(*(self._bring_up(t, targets) for t in waking))
            for t in waking:
                self._measure_soon(t)
        for t in targets:  # the rest one at a time: vLLM checks free GPU memory when it starts
            if t in waking and len(waking) > 1:
                continue
            self._cancel_restart(t.name)
            await self._await_room(self._room_needed([t]), self._cards_held(t))
            await self._bring_up(t, targets)
            self._measure_soon(t)
        took = self.clock.now() - t0
        for t in targets:
            t.last_switch_s = took
        self.last_switch_s = took
        self.switch_times.append(self.clock.now())
        self.active = [t.name for t in targets]
        self._placing = {}
        self.on_switch(awake_before, self.active, took)  # metrics (issue 14)
        self._later(self._ram_after_switch())
        return targets

    async def _ram_after_switch(self) -> None:
        """Once the switch's waiters run: what the targets hold awake (a start pins perf's KV offload)
        counts against the RAM budget now, not at the next background check."""
        await self.clock.sleep(RAM_AFTER_SWITCH_S)
        await self.keep_ram()

    async def _bring_up(self, server: Any, targets: list[Any]) -> None:
        """Wake (restoring a checkpointed one) or start one target; a start that fails spends its
        profile's start budget. A failed restore is a cold start, not a hang or an error."""
        starting, restoring = server.state not in LIVE, server.state == State.CHECKPOINTED
        try:
            await server.wake()
        except MMError as e:
            if restoring and server.state != State.AWAKE:
                await self._start_cold_instead([server], targets)
                await self._await_room(self._room_needed([server]), self._cards_held(server))
                return await self._bring_up(server, targets)
            if starting and server.state == State.FAILED:  # not a stop that cancelled the start
                self._start_failed(server, e)
            raise
        if starting:
            self._failures.pop(server.name, None)

    async def _make_room(self, targets: list[Any]) -> None:
        """Others stay awake where everything fits; else they sleep; then the least recently used
        sleepers stop until the targets fit beside what is left."""
        names = {t.name for t in targets}
        tp = [t.profile for t in targets]
        starting = frozenset(t.name for t in targets if t.state not in LIVE)
        others = [s for s in self.awake() if s.name not in names and self._shares_card(s.profile, tp)]
        early = self._restore_early(targets)
        try:
            if not self._fits(tp, [s.profile for s in others], self._asleep_profiles(names), starting):
                await asyncio.gather(*(self._drain_then_sleep(s) for s in others))
                for s in others:
                    self._measure_soon(s)
                early = early or self._restore_early(targets)
                # A sleep moves weights to RAM. The machine's free RAM is judged now (never swap);
                # the budget after the switch (_ram_after_switch): reading the servers' RAM here
                # cost a pair's switch 107 ms on the H100 mixed load.
                if self._under_floor():
                    await self._keep_ram(names)
            await self._move_sleepers_off(targets, names, tp, starting)
        finally:
            back = await early if early is not None else []
        failed = [t for t in back if t.state != State.ASLEEP]
        if failed:
            await self._start_cold_instead(failed, targets)

    async def _start_cold_instead(self, failed: list[Any], targets: list[Any]) -> None:
        """Targets whose restore failed (why is each server's own line, logged where it failed) start
        again cold on the same cards: what is left of them stops, and the room is made again for a
        start, which peaks above what a wake needs."""
        for t in failed:
            log.warning("%s: restoring it from its checkpoint failed; starting it again", t.name)
            await t.stop()
            self._placing[t.name] = getattr(t, "gpus", None)
        await self._make_room(targets)

    def _restore_early(self, targets: list[Any]) -> Awaitable[list[Any]] | None:
        """Checkpointed targets go back onto the card (still asleep) while the rest of the room is
        made, where their residue fits now, by the card and by the footprints: a restore (0.8-1.2 s on
        the H100) then overlaps the others' sleep and checkpoints (0.5-1.6 s) instead of following
        them. Returns what resolves to those targets once their restores end (failed or not)."""
        back = [t for t in targets if t.state == State.CHECKPOINTED and getattr(t, "restore", None)]
        if not back:
            return None
        tp, held, need = [t.profile for t in targets], 0, 0
        for s in self.servers.values():
            if s.state not in LIVE or s.state == State.CHECKPOINTED or not self._shares_card(s.profile, tp):
                continue
            fp = self.footprint(s.profile)
            if fp is None:
                return None
            held += fp.asleep if s.state == State.ASLEEP else fp.awake
        for t in back:
            fp = self.footprint(t.profile)
            if fp is None:
                return None
            need += fp.asleep
        held_cards = [self._cards_held(t) for t in back]
        cards = None if any(c is None for c in held_cards) else tuple(sorted({i for c in held_cards for i in c}))
        capacity, free = self.memory.capacity(), self.memory.free(cards) if cards else self.memory.free()
        if capacity is None or free is None or min(free, capacity - held) < need + RESTORE_EARLY_MARGIN:
            return None

        async def restore(t: Any) -> Any:
            try:
                await t.restore()
            except MMError:
                pass  # it failed: _make_room starts it cold
            return t
        return asyncio.ensure_future(asyncio.gather(*(restore(t) for t in back)))

    async def _move_sleepers_off(self, targets: list[Any], names: set[str], tp: list[Profile],
                                 starting: frozenset[str]) -> None:
        # Least recently used first; sleepers holding paused requests last (stopping one ends them).
        # Each is checkpointed off the card where it can be, else stopped; only sleepers on a card the
        # targets use. The sleepers that must go are chosen first and checkpointed together: one after
        # another, three took 2.5 s of a switch (the H100 rotation12 run).
        sleepers = sorted((s for s in self.servers.values() if s.state == State.ASLEEP and s.name not in names
                           and self._shares_card(s.profile, tp)), key=lambda s: (s.in_flight > 0, s.last_used))
        leaving: list[Any] = []
        for s in sleepers:
            gone = names | {v.name for v in leaving}
            if self._fits(tp, [a.profile for a in self.awake() if a.name not in names],
                          self._asleep_profiles(gone), starting):
                break
            leaving.append(s)
        room = await self._ram_for_checkpoints(leaving, names)
        done = await asyncio.gather(*(self._checkpoint(s) for s in room))
        off_the_card = {s.name for s, ok in zip(room, done) if ok}
        for s in leaving:
            if s.name in off_the_card or s.state != State.ASLEEP:
                continue  # checkpointed, or stopped meanwhile to keep RAM
            log.info("stopping %s (asleep, least recently used) to make room for %s", s.name, ", ".join(names))
            self._drop_come_back(s.name)  # its paused requests end with it: nobody to bring it back for
            await self._stop_released(s)

    async def _ram_for_checkpoints(self, servers: list[Any], exclude: set[str]) -> list[Any]:
        """Before checkpoints: other sleepers give way in RAM for what the checkpoints add (older
        ones first); then those of `servers` whose checkpoints fit in RAM, least recently used first
        (the rest are stopped instead)."""
        def adds(s: Any) -> int:
            fp = self.footprint(s.profile)
            return fp.asleep if fp and getattr(s, "can_checkpoint", False) else 0
        extra = sum(adds(s) for s in servers)
        if extra:
            await self._keep_ram(exclude, extra)  # (one of them may go itself, if oldest)
        room, total = [], 0
        for s in servers:
            if not getattr(s, "can_checkpoint", False) or s.state != State.ASLEEP:
                continue
            total += adds(s)
            if self._ram_short(total):
                break
            room.append(s)
        return room

    async def _checkpoint(self, server: Any) -> bool:
        """Move a sleeper's GPU residue to RAM (the CUDA driver's checkpoint; _ram_for_checkpoints
        made the RAM room); False where it stays on the card. A failed checkpoint stops it (one log
        line)."""
        if not getattr(server, "can_checkpoint", False) or server.state != State.ASLEEP:
            return False
        log.info("checkpointing %s (asleep, least recently used) to make room", server.name)
        try:
            await server.checkpoint()
        except MMError as e:
            log.warning("%s: checkpoint failed (%s); stopping it", server.name, _first_line(e))
            self._drop_come_back(server.name)
            await self._stop_released(server)
        return True

    # --- host RAM: the sleepers' share, and never a swapping machine ------------------------------------
    def _sleepers(self, exclude: set[str] = frozenset()) -> list[Any]:
        return [s for s in self.servers.values() if s.state in SLEEPING and s.name not in exclude]

    @staticmethod
    def _host_bytes(server: Any) -> int:
        measure = getattr(server, "host_bytes", None)
        return (measure() if measure else None) or 0

    async def _read_ram(self) -> None:
        """Fresh RAM readings of mm's servers, taken off the event loop: reading a vLLM process's
        smaps takes milliseconds, and a switch's first tokens stream meanwhile (the H100 mixed load:
        134 ms more per switch while they were read on the loop)."""
        readers = [s.read_host_bytes for s in self.servers.values()
                   if s.state in LIVE and hasattr(s, "read_host_bytes")]
        if readers:
            await asyncio.gather(*(asyncio.to_thread(read) for read in readers))

    def _freeing(self) -> int:
        """Bytes of RAM that servers stopped in the last FREED_GRACE_S held (not yet shown as free)."""
        now = self.clock.now()
        self._freed = [(t, n) for t, n in self._freed if now - t < FREED_GRACE_S]
        return sum(n for _, n in self._freed)

    def _machine_ram(self) -> tuple[int, int] | None:
        """(total, available) bytes of RAM, available counting what stopped servers are still freeing."""
        ram = self.host_ram() if self.host_ram else None
        return None if ram is None else (ram[0], min(ram[0], ram[1] + self._freeing()))

    async def ram_budget_read(self) -> int | None:
        """ram_budget_now() for `mm status`, its servers' RAM read off the event loop first."""
        await self._read_ram()
        return self.ram_budget_now()

    def ram_budget_now(self) -> int | None:
        """Bytes mm's servers may hold in RAM together now: config.toml's ram_budget, else derived."""
        if self.ram_budget is not None:
            return self.ram_budget
        ram = self._machine_ram()
        if ram is None:
            return None
        mine = sum(self._host_bytes(s) for s in self.servers.values() if s.state in LIVE)
        return derived_ram_budget(ram[0], ram[1], mine)

    def _ram_deficit(self, extra: int = 0) -> tuple[int, str]:
        """Bytes of the sleepers' RAM to free (0: none), and why: mm's servers, awake and asleep
        (plus `extra` bytes more), over the budget, or free RAM (less `extra`) under the floor."""
        need, why = 0, ""
        budget = self.ram_budget_now()
        if budget is not None:
            held = sum(self._host_bytes(s) for s in self.servers.values() if s.state in LIVE) + extra
            need, why = held - budget, f"mm's servers hold {held / GIB:.1f} GiB of RAM, over its budget {budget / GIB:.1f}"
        ram = self._machine_ram()
        if ram is not None and ram_floor(ram[0]) - (ram[1] - extra) > need:
            need = ram_floor(ram[0]) - (ram[1] - extra)
            why = f"{(ram[1] - extra) / GIB:.1f} GiB of RAM free, under its floor {ram_floor(ram[0]) / GIB:.1f}"
        return max(0, need), why

    def _under_floor(self) -> bool:
        """Whether the machine's free RAM is under ram_floor (one cheap reading, no process's)."""
        ram = self._machine_ram()
        return ram is not None and ram[1] < ram_floor(ram[0])

    def _ram_short(self, extra: int = 0) -> bool:
        return self._ram_deficit(extra)[0] > 0

    async def _keep_ram(self, exclude: set[str] = frozenset(), extra: int = 0) -> None:
        """Stop the least recently used sleepers until what they held covers the deficit, judged once
        before the first stop: a stopped process's RAM shows as free only a moment later, and judging
        again after each stop took every sleeper (the H200 rotation12 run: six stopped in 0.5 s)."""
        await self._read_ram()
        need, why = self._ram_deficit(extra)
        victims = []
        for s in sorted(self._sleepers(exclude), key=lambda s: (s.in_flight > 0, s.last_used)):
            if need <= 0:
                break
            held = self._host_bytes(s)
            log.info("stopping %s (asleep, least recently used) to free %.1f GiB of RAM: %s", s.name,
                     held / GIB, why)
            self._drop_come_back(s.name)
            victims.append(s)
            need -= max(held, 1)
        # together: a sleeper holding 70 GiB of pinned RAM took 10 s to exit (the H100 rotation12 run)
        await asyncio.gather(*(self._stop_released(s) for s in victims))

    async def keep_ram(self) -> None:
        """For the daemon's background duty: RAM may run short through other programs too."""
        await self._read_ram()
        if self._ram_short():
            await self._in_loop(self._keep_ram)

    async def _drain(self, server: Any, limit_s: float | None = None) -> None:
        """Requests already on a server finish before it sleeps; none is cut off by a switch. The
        wait ends early when the server stops serving (it crashed), and at limit_s (default
        drain_limit_s; the proxy's upstream timeout bounds each request as well)."""
        deadline = self.clock.now() + (self.drain_limit_s if limit_s is None else limit_s)
        while server.in_flight > 0 and server.state == State.AWAKE and self.clock.now() < deadline:
            await self._until_change(deadline)

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
        hold-off, so they go on within max_wait_s plus a switch once the switch that paused them ends.
        It is dropped if they all leave first (their client went away) or the server is stopped."""
        members = self.members(server.profile)
        key = tuple(m.name for m in members)
        if key in self._pending:
            self._pending[key].paused_for = server  # requests already wait for it: theirs brings it back
            return
        self._queue(server.profile, members, self.clock.now(), paused_for=server)

    def _drop_come_back(self, name: str) -> None:
        for pending in list(self._pending.values()):
            if pending.key[-1] == name and not pending.running and pending.requests == 0 \
                    and pending.since is not None:
                self._discard(pending)

    def switches_per_minute(self) -> int:
        now = self.clock.now()
        return sum(1 for t in self.switch_times if now - t <= 60)

    # --- commands: sleep, stop ---------------------------------------------------------------------------
    async def sleep(self, name: str | None = None, level: int | None = None) -> None:
        """Put one server (or every awake one) to sleep, after the requests counted on it finish."""
        servers = [self.servers[name]] if name else list(self.servers.values())

        async def job() -> None:
            await asyncio.gather(*(self._drain_then_sleep_at(s, level) for s in servers
                                   if s.state == State.AWAKE))
            for s in servers:
                self.measure(s)
            await self._keep_ram()
        await self._in_loop(job)
        self.active = [n for n in self.active if self.servers[n].state == State.AWAKE]

    async def _drain_then_sleep_at(self, server: Any, level: int | None) -> None:
        await self._drain(server)
        await server.sleep(level)

    async def stop(self, name: str | None = None) -> list[str]:
        """Stop one server (or all). Not queued behind a switch: a server that is loading is
        cancelled at once instead of waiting for the switch that started it."""
        servers = [self.servers[name]] if name else list(self.servers.values())
        for s in servers:
            self._cancel_restart(s.name)
            self._drop_come_back(s.name)  # it came back for paused requests, which the stop ends
        await asyncio.gather(*(self._stop_released(s) for s in servers))
        self.active = [n for n in self.active if self.servers[n].state == State.AWAKE]
        self._kick()
        return [s.name for s in servers]

    async def close(self) -> None:
        """Shutdown: refuse new work, cancel restarts and starts, stop every server."""
        self.closed = True
        for pending in list(self._pending.values()):
            self._discard(pending)
        for _, _, done in self._jobs:
            done.cancel()
        self._jobs.clear()
        if self._loop is not None:
            self._loop.cancel()
        for task in list(self._background):
            task.cancel()
        await self.stop()

    # --- crashes -----------------------------------------------------------------------------------------
    def on_death(self, server: Any, was: State) -> None:
        self.active = [n for n in self.active if n != server.name]
        self._kick()  # a drain waiting on it ends
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
        await self.clock.sleep(delay)
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
