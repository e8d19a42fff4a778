"""One supervised vLLM server: launch from argv (no shell), health, sleep/wake, stop, death watch.

Runs inside the daemon's event loop. The process launcher and the argv builder are injected so
fault tests can run the real supervisor against a fake server. What happens after a crash is not
decided here: the scheduler is told (on_death) and decides, so a restart goes through the same
switch logic as any other start.

A server listens on a unix socket in mm's private runtime folder unless its profile asks for TCP
(port or host): vLLM's dev-mode endpoints (/sleep, /wake_up, /collective_rpc) then answer only
this user.

A sleeping server can give the whole card back (checkpoint()): the CUDA driver's process checkpoint
moves what its engine still holds on the GPU to host RAM, and wake() restores it before vLLM's
wake_up. A checkpoint or restore that fails or hangs kills the server (FAILED, one log line): it
starts again cold, never hangs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, NoReturn

import httpx
import psutil

from mmlib import paths
from mmlib.errors import MMError
from mmlib.profiles import embedded
from mmlib.profiles.profile import Profile
from mmlib.profiles.vllm_cmd import (
    checkpoint_blocker,
    server_argv,
    server_env,
    sleep_available,
    sleep_keeps_requests,
    wants_tcp,
)
from mmlib.serve import records
from mmlib.serve.phases import PhaseTracker
from mmlib.serve.states import LIVE, State, check_transition
from mmlib.system import cuda_checkpoint, nvml, proctree
from mmlib.system.files import rotate, tail_lines
from mmlib.system.net import connect_host, free_port, port_taken

STOP_GRACE_S = 15.0
WATCH_INTERVAL_S = 0.2
LOG_TAIL_LINES = 15
OLD_LOGS, OLD_LOGS_BYTES = 3, 64 * 2**20  # per server: its last runs' logs, together at most this
CONTROL_TIMEOUT_S = 300.0  # a first sleep of a 7B model took 9 s; a level-2 weight reload reads the disk
# A checkpoint of a 1.4 GiB residue took 0.95 s and its restore 0.66 s (H100): a minute means stuck.
CHECKPOINT_TIMEOUT_S = 60.0
HOST_BYTES_TTL_S = 2.0  # host_bytes(): how long one reading of a server's RAM stands while its state is unchanged
log = logging.getLogger("mm.server")


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> list[str]:
    return tail_lines(path, lines)


async def spawn_process(argv: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with open(log, "ab") as out:
        # A new session makes the server its own process group, so stop() can signal vLLM's engine
        # children along with it.
        return await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)


def _socket_for(name: str) -> str | None:
    path = paths.sockets_dir() / f"{name}.sock"
    return str(path) if len(str(path)) <= paths.SOCKET_PATH_MAX else None


@dataclass
class ManagedServer:
    profile: Profile
    spawn: Callable[..., Any] = spawn_process
    argv_builder: Callable[[Profile, int | str], list[str]] = server_argv
    on_change: Callable[["ManagedServer"], None] = lambda s: None
    # Told after a crash, with the state the server was in; the scheduler decides what follows.
    on_death: Callable[["ManagedServer", State], Any] = lambda s, was: None
    # Told when a request ends: the scheduler's drains and paused servers' come-backs wait on it.
    on_release: Callable[["ManagedServer"], None] = lambda s: None
    # Whether the installed vLLM has --uds (asked of its own parser); None: TCP.
    uds_supported: Callable[[], Awaitable[bool]] | None = None
    # The CUDA driver's process checkpoint where this daemon may use it (config.toml checkpoint_sleepers,
    # the driver's support, asked once per daemon); None: sleepers keep their residue on the card.
    checkpoint_driver: Callable[[], cuda_checkpoint.Driver | None] = lambda: None
    checkpoint_timeout_s: float = CHECKPOINT_TIMEOUT_S
    state: State = State.STOPPED
    port: int | None = None
    uds: str | None = None
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
    slept_level: int | None = None
    # The cards it runs on (NVML's indices; the scheduler places it before a start); None: CUDA's choice.
    gpus: tuple[int, ...] | None = None
    argv: list[str] = field(default_factory=list)
    _gpu_pids: list[int] = field(default_factory=list)  # checkpointed: they leave NVML's list, so kept here
    _proc: Any = None
    _family: list[psutil.Process] = field(default_factory=list)
    _host_bytes_seen: tuple[Any, int | None, float, int | None] = (None, None, 0.0, None)
    _watch: asyncio.Task | None = None
    _starting: asyncio.Task | None = None
    _http: httpx.AsyncClient | None = None
    _phases: PhaseTracker | None = None  # what a starting server is doing, read from its log
    _log_read: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # --- what it is ----------------------------------------------------------------------------------
    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.on_release(self)

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def url(self) -> str | None:
        """The server's HTTP base. Over a unix socket the host part is a placeholder; use `http`."""
        if self.uds:
            return "http://mm-upstream"
        return f"http://{connect_host(self.profile.host)}:{self.port}" if self.port else None

    @property
    def where(self) -> str | None:
        """For people: where it listens."""
        return f"unix:{self.uds}" if self.uds else self.url

    @property
    def may_restart(self) -> bool:
        """Whether the restart policy still allows starting this server after a failure."""
        return self.profile.restart == "on-failure" and self.restarts < self.profile.max_restarts

    @property
    def can_sleep(self) -> bool:
        return sleep_available(self.profile)

    @property
    def can_pause_requests(self) -> bool:
        """Whether a sleep can keep the requests in flight paused until the wake-up (vLLM 0.26+)."""
        return self.can_sleep and sleep_keeps_requests()

    @property
    def can_checkpoint(self) -> bool:
        """Whether a sleep of this server can give the whole card back (checkpoint())."""
        return self.can_sleep and checkpoint_blocker(self.profile) is None and self.checkpoint_driver() is not None

    def host_bytes(self) -> int | None:
        """RAM its process tree holds now, as its PSS share (a checkpointed engine's GPU state
        included); None when gone. Read again at most every HOST_BYTES_TTL_S while its state stays
        the same: the scheduler asks for every sleeper at each switch, and reading smaps takes a
        vLLM process some milliseconds."""
        if not self.pid:
            return None
        state, pid, at, value = self._host_bytes_seen
        if state == self.state and pid == self.pid and time.monotonic() - at < HOST_BYTES_TTL_S:
            return value
        return self.read_host_bytes()

    def read_host_bytes(self) -> int | None:
        """host_bytes() read now (the scheduler calls it in a worker thread before it judges RAM)."""
        pid, state = self.pid, self.state
        value = proctree.pss_bytes(self._family or self._process_family()) if pid else None
        self._host_bytes_seen = (state, pid, time.monotonic(), value)
        return value

    def memory(self) -> dict[str, Any]:
        """What it holds now, GPU and RAM, as `mm status` shows it. A checkpointed engine has left
        NVML's list: it holds nothing on the card."""
        from mmlib.system.usage import tree_memory

        held = tree_memory(self.pid)
        if self.state == State.CHECKPOINTED:
            held.update(gpu_mib=0.0, gpu=None, cards={})
        return held

    @property
    def http(self) -> httpx.AsyncClient:
        """One client for health and control calls, over the socket where there is one."""
        if self._http is None:
            transport = httpx.AsyncHTTPTransport(uds=self.uds) if self.uds else None
            self._http = httpx.AsyncClient(base_url=self.url or "", transport=transport,
                                           timeout=httpx.Timeout(CONTROL_TIMEOUT_S, connect=5.0))
        return self._http

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _set_state(self, new: State, error: str | None = None) -> None:
        check_transition(self.state, new)
        self.state = new
        if error is not None or new in (State.STARTING, State.AWAKE):
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
            "aliases": list(p.aliases), "state": self.state.value, "url": self.where, "port": self.port,
            "uds": self.uds, "pid": self.pid, "started_at": self.started_at, "ready_at": self.ready_at,
            "uptime_s": time.time() - self.started_at if self.started_at and self.state in LIVE else None,
            "log": str(self.log_path) if self.log_path else None, "error": self.error,
            "error_log": self.error_log, "restarts": self.restarts, "sleep_mode": self.can_sleep,
            "sleep_level": self.profile.sleep.level if self.can_sleep else None,
            "switch": "sleep/wake" if self.can_sleep else "stop/start",
            "last_switch_s": self.last_switch_s, "in_flight": self.in_flight,
            "checkpoint": self.can_checkpoint, "checkpointed": self.state == State.CHECKPOINTED,
            "phase": self._phases.phase.to_dict() if self._phases and self.state == State.STARTING else None,
            "gpus": list(self.gpus) if self.gpus is not None else None, "parallel": p.parallel or None,
        }

    # --- start -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the server and wait until it answers. A start in progress is joined, not repeated;
        stop() cancels it (the waiters then get an MMError)."""
        async with self._lock:
            if self.state in (State.AWAKE, State.ASLEEP, State.CHECKPOINTED, State.WAKING, State.FALLING_ASLEEP):
                return
            if self.state != State.STARTING or self._starting is None:
                await self._launch()
                self._starting = asyncio.ensure_future(self._await_health(self.profile.startup_timeout))
            task = self._starting
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise MMError(f"{self.name}: the start was cancelled (stopped while loading)") from None
            raise

    async def _launch(self) -> None:
        p = self.profile
        if p.port and port_taken(p.host, p.port):
            raise MMError(f"{p.source}: port {p.port} is already in use on {p.host} "
                          f"(fix: stop what holds it, or remove `port` to let mm pick a free one)")
        if p.model and not embedded.is_embedded(p.model) and p.model.startswith(("/", ".", "~")) \
                and not Path(p.model).expanduser().exists():
            raise MMError(f"{p.source}: model: path {p.model} does not exist (fix: point model at a "
                          f"folder with config.json, or use a hub id)")
        await self._set_state(State.STARTING)
        await self._close_http()
        uds = not wants_tcp(p) and self.uds_supported is not None and await self.uds_supported()
        self.uds = _socket_for(self.name) if uds else None
        self.port = None if self.uds else (p.port or free_port(connect_host(p.host)))
        if self.uds:
            Path(self.uds).unlink(missing_ok=True)
        self.log_path = self._rotate_log()
        self._follow_log(from_start=False)
        self.started_at, self.ready_at, self.error_log, self.slept_level = time.time(), None, [], None
        try:
            if p.model and embedded.is_embedded(p.model):
                await asyncio.to_thread(embedded.ensure_converted, self.log_path)
            self.argv = self.argv_builder(p, self.uds or self.port)
            self._proc = await self.spawn(self.argv, server_env(p, cards=self.gpus), self.log_path)
        except Exception as e:  # the launch itself failed: nothing runs
            await self._fail(str(e))
            raise MMError(f"{p.name}: could not start: {e}") from None
        self.pid = self._proc.pid
        self._write_record()

    def _rotate_log(self) -> Path:
        """A fresh NAME.log; the last OLD_LOGS runs' logs stay beside it as NAME.log.1, .2, ..."""
        path = paths.logs_dir() / f"{self.name}.log"
        if path.exists() and path.stat().st_size:
            rotate(path, OLD_LOGS, OLD_LOGS_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, f"# mm: starting {self.name} at {time.ctime()}\n".encode())
        os.close(fd)
        return path

    async def _healthy(self) -> bool:
        try:
            return (await self.http.get("/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    def _follow_log(self, from_start: bool) -> None:
        """Start reading the server's log for its phases (from its start when adopting it)."""
        self._phases = PhaseTracker()
        size = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0
        self._log_read = 0 if from_start else size

    def _read_phase(self) -> None:
        """Feed what the log gained since the last look to the phase tracker."""
        if not self._phases or not self.log_path:
            return
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_read)
                data = f.read(1 << 20)
        except OSError:
            return
        self._log_read += len(data)
        self._phases.feed(data)

    async def _await_health(self, timeout: float) -> None:
        """Poll /health fast at first, backing off, while watching the process for an early exit
        and reading its log for the phase it is in. The timeout applies per phase: a start that
        keeps moving (downloading, loading, compiling, capturing graphs) is not cut off for being
        long, one stuck in a phase for `timeout` seconds is."""
        delay = 0.05
        if self._phases is None:
            self._follow_log(from_start=True)
        while True:
            if self._exited():
                await self._fail(f"exited during start-up (code {self._proc.returncode if self._proc else '?'})")
                raise MMError(self._failure_message())
            if await self._healthy():
                break
            self._read_phase()
            phase = self._phases.phase
            if time.time() - phase.since > timeout:
                await self._kill_family()
                await self._fail(f"no progress for {timeout:.0f} s while {phase.name} "
                                 f"(startup_timeout, which applies to each phase of a start)")
                raise MMError(self._failure_message())
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        self._family = self._process_family()
        self.ready_at = time.time()
        self.last_used = time.monotonic()
        await self._set_state(State.AWAKE)
        self._watch = asyncio.create_task(self._watch_family())

    def _exited(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is not None
        return self.pid is not None and proctree.all_dead(proctree.family(self.pid) or [])

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
        records.remove(self.name)
        await self._set_state(State.FAILED, error=reason)

    # --- adoption (a previous daemon's server) ----------------------------------------------------------
    async def adopt(self, record: dict[str, Any]) -> bool:
        """Take over a server a previous daemon started, if it is the same process. One that is still
        loading is adopted as starting and waited for, not killed."""
        if not records.still_running(record):
            return False
        self.pid, self.port, self.uds = record["pid"], record.get("port"), record.get("uds")
        self.started_at, self.argv = record.get("started_at"), record.get("argv", [])
        self.gpus = tuple(record["gpus"]) if isinstance(record.get("gpus"), list) else None
        self.log_path = Path(record["log"]) if record.get("log") else None
        self._family = self._process_family()
        if record.get("checkpointed_pids"):
            return await self._adopt_checkpointed(record)
        if not await self._healthy():
            await self._set_state(State.STARTING)
            self._starting = asyncio.ensure_future(self._await_health(self.profile.startup_timeout))
            return True
        sleeping = False
        if self.can_sleep:
            try:
                sleeping = bool((await self.http.get("/is_sleeping")).json().get("is_sleeping"))
            except (httpx.HTTPError, ValueError):
                return False
        self.ready_at = time.time()
        self.slept_level = record.get("slept_level") if sleeping else None
        await self._set_state(State.ASLEEP if sleeping else State.AWAKE)
        self._watch = asyncio.create_task(self._watch_family())
        return True

    async def _adopt_checkpointed(self, record: dict[str, Any]) -> bool:
        """A server checkpointed off the card stays so (it holds no GPU memory; the wake that needs it
        restores it) where the driver says each of its engine processes is still checkpointed;
        otherwise it cannot be brought back and is stopped (False)."""
        pids, drv = [int(p) for p in record["checkpointed_pids"]], self.checkpoint_driver()
        try:
            ok = drv is not None and all(drv.state(p) == cuda_checkpoint.ProcessState.CHECKPOINTED for p in pids)
        except cuda_checkpoint.CheckpointError:
            ok = False
        if not ok:
            log.warning("%s: recorded as checkpointed, but it cannot be restored here; stopping it", self.name)
            return False
        self._gpu_pids, self.slept_level, self.ready_at = pids, record.get("slept_level"), time.time()
        await self._set_state(State.ASLEEP)
        await self._set_state(State.CHECKPOINTED)
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
            was, pid, family = self.state, self.pid, self._family or self._process_family()
            which = "server" if pid in dead else f"engine process {dead[0]}"
            # Failed at once (requests get their answer now), then the rest of it is killed: a
            # half-dead vLLM (API up, engine gone) must not linger.
            while_ = {State.ASLEEP: " while asleep", State.CHECKPOINTED: " while checkpointed"}.get(was, "")
            await self._fail(f"{which} died unexpectedly{while_}")
            await proctree.terminate(pid, family, STOP_GRACE_S)
            self._family = []
        result = self.on_death(self, was)
        if asyncio.iscoroutine(result):
            await result

    # --- sleep / wake ----------------------------------------------------------------------------
    async def _control(self, what: str, call: Callable[[], Any]) -> None:
        """A sleep/wake call; any failure becomes one line naming the server and the call."""
        try:
            r = await call()
            r.raise_for_status()
        except httpx.HTTPStatusError as e:
            raise MMError(f"{self.name}: {what} answered HTTP {e.response.status_code}: "
                          f"{e.response.text.strip()[:200]}") from None
        except httpx.HTTPError as e:
            raise MMError(f"{self.name}: {what} failed ({type(e).__name__}: {e})") from None

    async def sleep(self, level: int | None = None, keep_requests: bool = False) -> None:
        """Put an awake server to sleep (at the profile's level unless told); without sleep mode, stop it.
        keep_requests: the requests in flight pause and go on after the wake-up (vLLM's mode=keep)
        instead of being aborted; only where can_pause_requests."""
        async with self._lock:
            if self.state != State.AWAKE:
                return
            if not self.can_sleep:
                await self._stop_locked()
                return
            level = level or self.profile.sleep.level
            params = {"level": level, **({"mode": "keep"} if keep_requests else {})}
            await self._set_state(State.FALLING_ASLEEP)
            try:
                await self._control(f"sleep (level {level})", lambda: self.http.post("/sleep", params=params))
            except MMError as e:
                await self._kill_family()
                await self._fail(str(e))
                raise
            self.slept_level = level
            self._write_record()
            await self._set_state(State.ASLEEP)

    async def wake(self) -> None:
        """Make the server answer requests: wake it if asleep, start it if stopped or failed."""
        async with self._lock:
            if self.state == State.AWAKE:
                return
            if self.state in (State.ASLEEP, State.CHECKPOINTED):
                await self._wake_locked()
                return
        await self.start()

    async def _wake_locked(self) -> None:
        checkpointed = self.state == State.CHECKPOINTED
        await self._set_state(State.WAKING)
        if checkpointed:
            await self._restore()
        try:
            if self.slept_level == 2:
                # Level 2 dropped the weights: wake their memory, load them again, then the KV cache.
                # A plain /wake_up would answer with whatever the weight memory holds (garbage).
                await self._control("wake_up (weights)", lambda: self.http.post("/wake_up", params={"tags": "weights"}))
                await self._control("reload_weights", lambda: self.http.post(
                    "/collective_rpc", json={"method": "reload_weights"}))
                await self._control("wake_up (kv_cache)",
                                    lambda: self.http.post("/wake_up", params={"tags": "kv_cache"}))
            else:
                await self._control("wake_up", lambda: self.http.post("/wake_up"))
        except MMError as e:
            await self._kill_family()
            await self._fail(str(e))
            raise MMError(self._failure_message()) from None
        self.slept_level = None
        self._write_record()
        self.last_used = time.monotonic()
        await self._set_state(State.AWAKE)

    # --- checkpoint: a sleeper gives the whole card back ------------------------------------------------
    async def checkpoint(self) -> None:
        """Move what this sleeping server still holds on the GPU (level 1 or 2, or paused with
        mode=keep) to host RAM with the CUDA driver's process checkpoint: the card is freed and
        wake() restores it. A failure or a timeout kills the server (FAILED, one log line) and raises
        MMError: it starts again cold when next needed."""
        async with self._lock:
            if self.state == State.CHECKPOINTED:
                return
            if self.state != State.ASLEEP:
                raise MMError(f"{self.name}: only a sleeping server can be checkpointed (it is {self.state.value})")
            drv = self.checkpoint_driver()
            why = checkpoint_blocker(self.profile) or (None if drv else "the CUDA driver's process checkpoint "
                                                        "is off (checkpoint_sleepers) or not supported here")
            if why or drv is None:
                raise MMError(f"{self.name}: cannot be checkpointed: {why}")
            t0 = time.perf_counter()
            try:
                pids = await asyncio.to_thread(self._pids_on_gpu)
                if not pids:
                    raise cuda_checkpoint.CheckpointError("no process of it holds GPU memory per NVML")
                await asyncio.wait_for(asyncio.to_thread(cuda_checkpoint.suspend, pids, drv),
                                       self.checkpoint_timeout_s)
            except (cuda_checkpoint.CheckpointError, asyncio.TimeoutError) as e:
                await self._give_up(f"checkpoint failed ({_reason(e, self.checkpoint_timeout_s)})")
            self._gpu_pids = pids
            self._write_record()
            await self._set_state(State.CHECKPOINTED)
            log.info("%s: checkpointed off the card in %.2f s (pids %s)", self.name, time.perf_counter() - t0,
                     ", ".join(map(str, pids)))

    async def restore(self) -> None:
        """Bring a checkpointed sleeper back onto the card, still asleep (a switch restores its target
        while it checkpoints others, then wakes it). A failure stops it, as in wake()."""
        async with self._lock:
            if self.state != State.CHECKPOINTED:
                return
            await self._restore()
            self._write_record()
            await self._set_state(State.ASLEEP)

    def _pids_on_gpu(self) -> list[int]:
        """Its processes that hold the GPU: the server's family as NVML lists them (vLLM's engine)."""
        family = {p.pid for p in (self._family or self._process_family())}
        return sorted(family & nvml.session().compute_pids())

    async def _restore(self) -> None:
        """Bring a checkpointed engine back onto the card (restore, unlock) before vLLM's wake_up."""
        drv, t0 = self.checkpoint_driver(), time.perf_counter()
        try:
            if drv is None:
                raise cuda_checkpoint.CheckpointError("the CUDA driver's process checkpoint is not available")
            await asyncio.wait_for(asyncio.to_thread(cuda_checkpoint.resume, self._gpu_pids, drv),
                                   self.checkpoint_timeout_s)
        except (cuda_checkpoint.CheckpointError, asyncio.TimeoutError) as e:
            await self._give_up(f"restore from its checkpoint failed ({_reason(e, self.checkpoint_timeout_s)})")
        log.info("%s: restored onto the card in %.2f s", self.name, time.perf_counter() - t0)
        self._gpu_pids = []

    async def _give_up(self, reason: str) -> NoReturn:
        """A checkpoint or restore went wrong: kill the server (it starts again cold) and say why, once."""
        await self._kill_family(grace_s=0.0)
        self._gpu_pids = []
        await self._fail(f"{reason}; stopped, it starts again cold")
        log.warning("%s: %s", self.name, self.error)
        raise MMError(f"{self.name}: {self.error}")

    # --- stop ------------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop the server; returns once every process of it is gone. A start in progress is cancelled."""
        self._cancel_start()
        async with self._lock:
            self._cancel_start()  # a start that launched while this stop waited for the lock
            await self._stop_locked()

    def _cancel_start(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()

    async def _stop_locked(self) -> None:
        if self.state == State.FAILED:
            await self._set_state(State.STOPPED)
            return
        if self.state not in LIVE:
            return
        # A checkpointed engine cannot run its shutdown (its CUDA calls would wait for a restore): kill it.
        grace = 0.0 if self.state == State.CHECKPOINTED else STOP_GRACE_S
        await self._set_state(State.STOPPING)
        await self._kill_family(grace)
        self._gpu_pids = []
        records.remove(self.name)
        self.pid, self.started_at, self.slept_level = None, None, None
        await self._close_http()
        if self.uds:
            Path(self.uds).unlink(missing_ok=True)
        await self._set_state(State.STOPPED)

    async def _kill_family(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the process group (vLLM's engine processes are in it), SIGKILL what is left."""
        await proctree.terminate(self.pid, self._family or self._process_family(), grace_s)
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except (asyncio.TimeoutError, ProcessLookupError):
                pass
        self._family = []

    # --- the record that lets a restarted daemon find this server -------------------------------------
    def _write_record(self) -> None:
        records.write(self.name, {
            "profile": self.name, "pid": self.pid, "create_time": proctree.create_time(self.pid),
            "port": self.port, "uds": self.uds, "host": self.profile.host, "model": self.profile.model,
            "started_at": self.started_at, "log": str(self.log_path), "argv": self.argv,
            "slept_level": self.slept_level, "checkpointed_pids": self._gpu_pids,
            "gpus": list(self.gpus) if self.gpus is not None else None,
        })


def _reason(e: BaseException, timeout_s: float) -> str:
    return f"no answer from the CUDA driver in {timeout_s:g} s" if isinstance(e, asyncio.TimeoutError) else str(e)
