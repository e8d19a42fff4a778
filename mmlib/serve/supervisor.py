"""One supervised vLLM server: launch from argv (no shell), health, sleep/wake, stop, death watch.

Runs inside the daemon's event loop. The process launcher and the argv builder are injected so
fault tests can run the real supervisor against a fake server.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil

from mmlib import paths
from mmlib.errors import MMError
from mmlib.profiles import embedded
from mmlib.profiles.profile import Profile
from mmlib.profiles.vllm_cmd import server_argv, server_env, sleep_available
from mmlib.serve.states import LIVE, State, check_transition
from mmlib.system import proctree
from mmlib.system.files import replace_atomic, tail_lines
from mmlib.system.net import connect_host, free_port, port_taken

STOP_GRACE_S = 15.0
WATCH_INTERVAL_S = 0.2
LOG_TAIL_LINES = 15


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> list[str]:
    return tail_lines(path, lines)


async def spawn_process(argv: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as out:
        # A new session makes the server its own process group, so stop() can signal vLLM's engine
        # children along with it.
        return await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)


@dataclass
class ManagedServer:
    profile: Profile
    spawn: Callable[..., Any] = spawn_process
    argv_builder: Callable[[Profile, int], list[str]] = server_argv
    on_change: Callable[["ManagedServer"], None] = lambda s: None
    state: State = State.STOPPED
    port: int | None = None
    pid: int | None = None
    started_at: float | None = None
    ready_at: float | None = None
    log_path: Path | None = None
    error: str | None = None
    error_log: list[str] = field(default_factory=list)
    restarts: int = 0
    last_switch_s: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    argv: list[str] = field(default_factory=list)
    _proc: Any = None
    _family: list[psutil.Process] = field(default_factory=list)
    _watch: asyncio.Task | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # --- state -----------------------------------------------------------------------------------
    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def url(self) -> str | None:
        return f"http://{connect_host(self.profile.host)}:{self.port}" if self.port else None

    @property
    def may_restart(self) -> bool:
        """Whether the restart policy still allows starting this server after a failure."""
        return self.profile.restart == "on-failure" and self.restarts < self.profile.max_restarts

    @property
    def can_sleep(self) -> bool:
        return sleep_available(self.profile)

    async def _set_state(self, new: State, error: str | None = None) -> None:
        check_transition(self.state, new)
        self.state = new
        if error is not None or new in (State.STARTING, State.READY):
            self.error = error
        self.on_change(self)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, *states: State, timeout: float | None = None) -> State:
        async def until() -> State:
            async with self._changed:
                await self._changed.wait_for(lambda: self.state in states)
            return self.state
        return await asyncio.wait_for(until(), timeout)

    def snapshot(self) -> dict[str, Any]:
        p = self.profile
        return {
            "profile": p.name, "model": p.model, "served_model_name": p.served_model_name,
            "aliases": list(p.aliases), "state": self.state.value, "url": self.url, "port": self.port,
            "pid": self.pid, "started_at": self.started_at, "ready_at": self.ready_at,
            "uptime_s": time.time() - self.started_at if self.started_at and self.state in LIVE else None,
            "log": str(self.log_path) if self.log_path else None, "error": self.error,
            "error_log": self.error_log, "restarts": self.restarts, "sleep_mode": self.can_sleep,
            "switch": "sleep/wake" if self.can_sleep else "stop/start",
            "last_switch_s": self.last_switch_s, "in_flight": self.in_flight,
        }

    # --- start -----------------------------------------------------------------------------------
    async def start(self) -> None:
        async with self._lock:
            if self.state in (State.READY, State.SLEEPING, State.WAKING):
                return
            await self._start_locked()

    async def _start_locked(self) -> None:
        p = self.profile
        if p.port and port_taken(p.host, p.port):
            raise MMError(f"{p.source}: port {p.port} is already in use on {p.host} "
                          f"(fix: stop what holds it, or remove `port` to let mm pick a free one)")
        if p.model and not embedded.is_embedded(p.model) and p.model.startswith(("/", ".", "~")) \
                and not Path(p.model).expanduser().exists():
            raise MMError(f"{p.source}: model: path {p.model} does not exist (fix: point model at a "
                          f"folder with config.json, or use a hub id)")
        await self._set_state(State.STARTING)
        self.port = p.port or free_port(connect_host(p.host))
        self.log_path = self._rotate_log()
        self.started_at, self.ready_at, self.error_log = time.time(), None, []
        try:
            if p.model and embedded.is_embedded(p.model):
                await asyncio.to_thread(embedded.ensure_converted, self.log_path)
            self.argv = self.argv_builder(p, self.port)
            self._proc = await self.spawn(self.argv, server_env(p), self.log_path)
        except Exception as e:  # the launch itself failed: nothing runs
            await self._fail(str(e))
            raise MMError(f"{p.name}: could not start: {e}") from None
        self.pid = self._proc.pid
        self._write_state_file()
        await self._await_health(p.startup_timeout)

    def _rotate_log(self) -> Path:
        path = paths.logs_dir() / f"{self.name}.log"
        if path.exists() and path.stat().st_size:
            os.replace(path, path.with_suffix(".log.1"))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, f"# mm: starting {self.name} at {time.ctime()}\n".encode())
        os.close(fd)
        return path

    async def _await_health(self, timeout: float) -> None:
        """Poll /health fast at first, backing off, while watching the process for an early exit."""
        deadline, delay = time.monotonic() + timeout, 0.05
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._exited():
                    await self._fail(f"exited during start-up (code {self._proc.returncode})")
                    raise MMError(self._failure_message())
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 1.0)
            else:
                await self._kill_family()
                await self._fail(f"not healthy after {timeout:.0f} s (startup_timeout)")
                raise MMError(self._failure_message())
        self._family = self._process_family()
        self.ready_at = time.time()
        self.last_used = time.monotonic()
        await self._set_state(State.READY)
        self._watch = asyncio.create_task(self._watch_family())

    def _exited(self) -> bool:
        return self._proc is not None and self._proc.returncode is not None

    def _failure_message(self) -> str:
        from mmlib.guard import diagnose  # matches the log against known failures

        lines = [f"{self.name}: {self.error}; last lines of {self.log_path}:"] + [f"  | {l}" for l in self.error_log]
        # The root cause often sits above vLLM's closing traceback, so search the whole log.
        found = diagnose.diagnose_log(self.log_path)
        if found and found.line not in "\n".join(self.error_log):
            lines.append(f"  | ... {found.line}")
        return "\n".join(lines + ([f"hint: {found.hint}"] if found else []))

    async def _fail(self, reason: str) -> None:
        self.error_log = log_tail(self.log_path)
        self.pid = None
        self._remove_state_file()
        await self._set_state(State.FAILED, error=reason)

    async def adopt(self, record: dict[str, Any]) -> bool:
        """Take over a server a previous daemon started, if it is the same process and healthy."""
        try:
            proc = psutil.Process(record["pid"])
            if record.get("create_time") and abs(proc.create_time() - record["create_time"]) > 1:
                return False  # the pid was reused by something else
        except (psutil.Error, KeyError, TypeError):
            return False
        self.pid, self.port = record["pid"], record["port"]
        self.started_at, self.argv = record.get("started_at"), record.get("argv", [])
        self.log_path = Path(record["log"]) if record.get("log") else None
        sleeping = False
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                if (await client.get(f"{self.url}/health")).status_code != 200:
                    return False
                if self.can_sleep:
                    sleeping = bool((await client.get(f"{self.url}/is_sleeping")).json().get("is_sleeping"))
        except (httpx.HTTPError, ValueError):
            return False
        self._family = self._process_family()
        self.ready_at = time.time()
        await self._set_state(State.READY)
        if sleeping:
            await self._set_state(State.SLEEPING)
        self._watch = asyncio.create_task(self._watch_family())
        return True

    # --- death watch -----------------------------------------------------------------------------
    def _process_family(self) -> list[psutil.Process]:
        return proctree.family(self.pid)

    async def _watch_family(self) -> None:
        """Notice within WATCH_INTERVAL_S when the server or any of its engine processes dies."""
        while self.state in LIVE:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self.state == State.STOPPING:
                return
            dead = [p.pid for p in self._family if proctree.is_dead(p)]
            if dead and self.state in LIVE and self.state != State.STOPPING:
                await self._on_death(dead)
                return

    async def _on_death(self, dead: list[int]) -> None:
        async with self._lock:
            if self.state not in LIVE or self.state == State.STOPPING:
                return
            which = "server" if self.pid in dead else f"engine process {dead[0]}"
            await self._kill_family()  # a half-dead vLLM (API up, engine gone) must not linger
            await self._fail(f"{which} died unexpectedly")
        if self.may_restart:
            self.restarts += 1
            await asyncio.sleep(min(2 ** self.restarts, 30) * 0.5)  # bounded backoff
            try:
                await self.start()
            except MMError:
                pass

    # --- sleep / wake ----------------------------------------------------------------------------
    async def sleep(self) -> None:
        async with self._lock:
            if self.state != State.READY:
                return
            if not self.can_sleep:
                await self._stop_locked()
                return
            async with httpx.AsyncClient(timeout=120) as client:
                r = await client.post(f"{self.url}/sleep", params={"level": self.profile.sleep.level})
                r.raise_for_status()
            await self._set_state(State.SLEEPING)

    async def wake(self) -> None:
        """Make the server answer requests: wake it if asleep, start it if stopped or failed."""
        async with self._lock:
            if self.state == State.READY:
                return
            if self.state != State.SLEEPING:
                await self._start_locked()
                return
            await self._set_state(State.WAKING)
            try:
                async with httpx.AsyncClient(timeout=120) as client:
                    (await client.post(f"{self.url}/wake_up")).raise_for_status()
            except httpx.HTTPError as e:
                await self._kill_family()
                await self._fail(f"wake_up failed: {e}")
                raise MMError(self._failure_message()) from None
            self.last_used = time.monotonic()
            await self._set_state(State.READY)

    # --- stop ------------------------------------------------------------------------------------
    async def stop(self) -> None:
        async with self._lock:
            await self._stop_locked()

    async def _stop_locked(self) -> None:
        if self.state == State.FAILED:
            await self._set_state(State.STOPPED)
            return
        if self.state not in LIVE:
            return
        await self._set_state(State.STOPPING)
        await self._kill_family()
        self._remove_state_file()
        self.pid, self.started_at = None, None
        await self._set_state(State.STOPPED)

    async def _kill_family(self) -> None:
        """SIGTERM the process group (vLLM's engine processes are in it), SIGKILL what is left."""
        await proctree.terminate(self.pid, self._family or self._process_family(), STOP_GRACE_S)
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except (asyncio.TimeoutError, ProcessLookupError):
                pass
        self._family = []

    # --- state file (lets a restarted daemon find servers it did not start) ------------------------
    def _state_file(self) -> Path:
        d = paths.state_dir() / "servers"
        d.mkdir(exist_ok=True, mode=0o700)
        return d / f"{self.name}.json"

    def _write_state_file(self) -> None:
        created = proctree.create_time(self.pid)
        replace_atomic(self._state_file(), mode=0o600, text=json.dumps({
            "profile": self.name, "pid": self.pid, "create_time": created, "port": self.port,
            "host": self.profile.host, "model": self.profile.model, "started_at": self.started_at,
            "log": str(self.log_path), "argv": self.argv,
        }))

    def _remove_state_file(self) -> None:
        try:
            self._state_file().unlink()
        except FileNotFoundError:
            pass
