"""Which servers are awake: one place decides (Ollama's sched.go idea), under one lock.

A switch puts to sleep (or stops, where sleep mode is unavailable) every awake server whose memory
share does not fit beside the target, then wakes or starts the target. Requests that arrive during
a switch wait on the same activation instead of starting a second one.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from mmlib.errors import MMError
from mmlib.profiles.profile import Profile, load_profile
from mmlib.serve.states import LIVE, State
from mmlib.serve.supervisor import ManagedServer

# Shares of one GPU's memory (vLLM's gpu_memory_utilization) that may be awake at once.
GPU_SHARE_LIMIT = 1.0


def fit_together(profiles: list[Profile]) -> bool:
    """One server has the GPU to itself unless every awake one declares a share and they fit."""
    if len(profiles) <= 1:
        return True
    return all(p.share_gpu for p in profiles) and \
        sum(p.memory_share for p in profiles) <= GPU_SHARE_LIMIT + 1e-9


@dataclass
class _Pending:
    task: asyncio.Task
    requests: int = 0


class Scheduler:
    def __init__(self, make_server: Callable[[Profile], ManagedServer],
                 load: Callable[[str], Profile] = load_profile):
        self.servers: dict[str, ManagedServer] = {}
        self.active: list[str] = []  # profiles of the last activation, the target of model "default"
        self.last_switch_s: float | None = None
        self._make_server = make_server
        self._load = load
        self._switch = asyncio.Lock()
        self._pending: dict[tuple[str, ...], _Pending] = {}
        self.on_switch: Callable[[list[str], list[str], float], None] = lambda before, after, s: None  # metrics

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

    def server_for(self, profile: Profile) -> ManagedServer:
        """The server of this profile, replaced by a fresh one if the profile changed while it was down."""
        server = self.servers.get(profile.name)
        if server is None or (server.state not in LIVE and server.profile != profile):
            server = self._make_server(profile)
            self.servers[profile.name] = server
        return server

    def awake(self) -> list[ManagedServer]:
        return [s for s in self.servers.values() if s.state in (State.READY, State.WAKING, State.STARTING)]

    async def acquire(self, profile: Profile) -> ManagedServer:
        """A ready server of a (non-stack) profile with this request counted on it, so that no
        switch puts it to sleep before the request is answered. The caller must release() it."""
        server = self._ready_now(profile)
        if server is not None:
            server.in_flight += 1
            return server
        failed = self.servers.get(profile.name)
        if failed is not None and failed.state == State.FAILED and not failed.may_restart:
            # A crashed server is restarted by its policy, not by whoever asks next: say so at once.
            raise MMError(f"{profile.name} failed ({failed.error}); `mm up {profile.name}` starts it again")
        return (await self._join(profile, wants_request=True))[-1]

    async def activate(self, profile: Profile) -> list[ManagedServer]:
        """Make the profile's servers answer (for commands; requests use acquire). A command is
        the user asking again, so a failed server gets a fresh restart budget."""
        for member in self.members(profile):
            server = self.servers.get(member.name)
            if server is not None and server.state == State.FAILED:
                server.restarts = 0
        return self._ready_now_all(profile) or await self._join(profile, wants_request=False)

    def _ready_now_all(self, profile: Profile) -> list[ManagedServer] | None:
        # Only while no switch is under way or queued: a request for the current model must not
        # jump ahead of a switch that is waiting for that model's requests to finish.
        if self._switch.locked():
            return None
        members = self.members(profile)
        servers = [self.servers.get(m.name) for m in members]
        if all(s is not None and s.state == State.READY and s.profile.model == m.model
               for s, m in zip(servers, members)) and self._fits_all():
            for s in servers:
                s.last_used = time.monotonic()
            return servers
        return None

    def _ready_now(self, profile: Profile) -> ManagedServer | None:
        servers = self._ready_now_all(profile)
        return servers[-1] if servers else None

    async def _join(self, profile: Profile, wants_request: bool) -> list[ManagedServer]:
        """Wait on the pending activation of this target, starting one if there is none.

        Requests that join are counted onto the server by the activation itself, at the instant it
        completes, so the next queued switch cannot put the server to sleep before they run."""
        key = tuple(m.name for m in self.members(profile))
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(asyncio.ensure_future(self._activate(profile, key)))
        if wants_request:
            pending.requests += 1
        return await asyncio.shield(pending.task)

    def _fits_all(self) -> bool:
        return fit_together([s.profile for s in self.awake()])

    async def _activate(self, profile: Profile, key: tuple[str, ...]) -> list[ManagedServer]:
        async with self._switch:
            try:
                targets = await self._switch_to(profile)
            finally:
                pending = self._pending.pop(key)
            # Still under the lock: the waiting requests hold their places before the next switch.
            targets[-1].in_flight += pending.requests
            return targets

    async def _switch_to(self, profile: Profile) -> list[ManagedServer]:
        t0 = time.perf_counter()
        awake_before = [s.name for s in self.awake()]  # metrics (issue 14)
        for m in self.members(profile):  # `mm chat OTHER/MODEL` on a running profile: a new server
            old = self.servers.get(m.name)
            if old is not None and old.state in LIVE and old.profile.model != m.model:
                await self._drain_then_stop(old)
        targets = [self.server_for(m) for m in self.members(profile)]
        if not fit_together([t.profile for t in targets]):
            budget = sum(t.profile.memory_share for t in targets)
            raise MMError(f"{profile.source}: stack: its servers cannot be awake together (shares add "
                          f"up to {budget:.2f}; fix: set share_gpu = true in each member profile and "
                          f"engine.gpu_memory_utilization values that add up to at most 1)")
        # Make room: everyone else sleeps unless all declared shares fit together.
        others = [s for s in self.awake() if s not in targets]
        if not fit_together([t.profile for t in targets] + [s.profile for s in others]):
            await asyncio.gather(*(self._drain_then_sleep(s) for s in others))
        for t in targets:  # one at a time: vLLM checks free GPU memory when it starts
            await t.wake()
        took = time.perf_counter() - t0
        for t in targets:
            t.last_switch_s = took
        self.last_switch_s = took
        self.active = [t.name for t in targets]
        self.on_switch(awake_before, self.active, took)  # metrics (issue 14)
        return targets

    @staticmethod
    async def _drain(server: ManagedServer, limit_s: float = 600.0) -> None:
        """Requests already on a server finish before it sleeps; none is cut off by a switch."""
        deadline = time.monotonic() + limit_s
        while server.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _drain_then_sleep(self, server: ManagedServer) -> None:
        await self._drain(server)
        await server.sleep()

    async def _drain_then_stop(self, server: ManagedServer) -> None:
        await self._drain(server)
        await server.stop()

    async def sleep(self, name: str | None = None) -> None:
        servers = [self.servers[name]] if name else list(self.servers.values())
        async with self._switch:
            await asyncio.gather(*(s.sleep() for s in servers if s.state == State.READY))

    async def stop(self, name: str | None = None) -> list[str]:
        servers = [self.servers[name]] if name else list(self.servers.values())
        async with self._switch:
            await asyncio.gather(*(s.stop() for s in servers))
        self.active = [n for n in self.active if self.servers[n].state == State.READY]
        return [s.name for s in servers]
