"""The daemon: owns the vLLM servers, serves the control API (unix socket, 0600) and the proxy (TCP).

One process, one event loop: the scheduler, every supervisor and both HTTP servers share it, so
state has one owner and needs no locking across threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mmlib import paths
from mmlib.errors import MMError, Refused
from mmlib.guard.fit import Footprint
from mmlib.guard.preflight import Preflight
from mmlib.profiles.config import Config, load_config
from mmlib.profiles.profile import Profile, load_all, load_profile
from mmlib.profiles.vllm_cmd import has_uds
from mmlib.serve import cards, records
from mmlib.serve.auth import bearer_ok, host_guard
from mmlib.serve.memory import CardMemory
from mmlib.serve.metrics import Metrics
from mmlib.serve.page import Page
from mmlib.serve.proxy import ModelIndex, Proxy
from mmlib.serve.scheduler import Policy, Scheduler
from mmlib.serve.states import State
from mmlib.serve.supervisor import ManagedServer
from mmlib.system import cuda_checkpoint
from mmlib.system.files import replace_atomic
from mmlib.system.usage import host_ram

log = logging.getLogger("mm.daemon")
IDLE_CHECK_S = 1.0


def footprints_path() -> Path:
    return paths.footprints_file()


class QuietServer(uvicorn.Server):
    """uvicorn would take SIGINT/SIGTERM for itself; the daemon handles them (stopping vLLM first)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics(status=self._status)  # metrics and page (issue 14)
        # Every start passes the same checks as `mm up`, in a thread, before anything is slept or stopped.
        self.preflight = Preflight(self._vllm_spec, self._card, own_ports=self._own_ports)
        self.scheduler = Scheduler(self.make_server, drain_limit_s=config.upstream_timeout,
                                   memory=CardMemory(config.gpu_budget, predict=self._predict),
                                   policy=Policy(max_wait_s=config.switch_max_wait,
                                                 pause_in_flight=config.switch_pause_in_flight,
                                                 pause_after_s=config.switch_pause_after),
                                   preflight=self.preflight, ram_budget=config.ram_budget, host_ram=host_ram)
        self.scheduler.on_switch = self.metrics.switched
        self.index = ModelIndex(load_all)
        self.proxy = Proxy(self.scheduler, self.index, lambda: load_profile(config.default_profile),
                           api_key=config.api_key, upstream_timeout=config.upstream_timeout,
                           max_body=config.max_body_mib * 2**20, metrics=self.metrics, guard=self.preflight)
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self._spec: asyncio.Future | None = None
        self._saved_footprints = ""
        self.background_errors: dict[str, dict] = {}  # background duty -> its last failure (status)
        self._duties_run: set[str] = set()
        self._cuda: tuple[cuda_checkpoint.Driver | None] | None = None  # asked once: (driver or None,)
        self._cuda_lock = threading.Lock()  # asked first in a thread at start-up (cuInit takes a moment)
        self.page = Page(self._status, {"wake": self._activate, "sleep": self._sleep, "stop": self._stop},
                         self.metrics, api_key=config.api_key, stopping=self.stopping)  # page: /, /metrics, /mm/...
        self.proxy.app = host_guard(self.page.around(self.proxy.app), config.api_key, config.proxy_host)
        self.control = Starlette(routes=[
            Route("/ping", self.ping, methods=["GET"]),
            Route("/status", self.status, methods=["GET"]),
            Route("/up", self.up, methods=["POST"]),
            Route("/switch", self.switch, methods=["POST"]),
            Route("/sleep", self.sleep, methods=["POST"]),
            Route("/wake", self.wake, methods=["POST"]),
            Route("/stop", self.stop, methods=["POST"]),
            Route("/shutdown", self.shutdown, methods=["POST"]),
        ])

    def make_server(self, profile: Profile) -> ManagedServer:
        return ManagedServer(profile, uds_supported=self.uds_supported, argv_builder=self._argv,
                             on_change=self.metrics.state_changed, checkpoint_driver=self.checkpoint_driver)

    def checkpoint_driver(self) -> cuda_checkpoint.Driver | None:
        """The CUDA driver's process checkpoint for sleepers, where config.toml allows it and the
        driver has it: asked once, said once in the log."""
        with self._cuda_lock:
            return self._checkpoint_driver()

    def _checkpoint_driver(self) -> cuda_checkpoint.Driver | None:
        if self._cuda is None:
            drv = None
            if not self.config.checkpoint_sleepers:
                log.info("sleepers are not checkpointed off the card (checkpoint_sleepers = false)")
            else:
                found = cuda_checkpoint.support()
                drv = cuda_checkpoint.driver() if found.ok else None
                log.info("sleepers %s: %s", "can give the whole card back" if found.ok else
                         "keep their residue on the card", found.why)
            self._cuda = (drv,)
        return self._cuda[0]

    async def _vllm_spec(self):
        """The installed vLLM's own argument parser, asked once (in a thread: the first time it
        imports vLLM in a helper process, though the CLI's preflight usually did it already)."""
        if self._spec is None:
            self._spec = asyncio.ensure_future(asyncio.to_thread(_load_spec))
        return await self._spec

    async def uds_supported(self) -> bool:
        spec = await self._vllm_spec()
        return has_uds(spec)

    def _card(self):
        from mmlib.guard import fit
        from mmlib.system import nvml

        return fit.card(self.config, nvml.probe(with_processes=False))

    def _own_ports(self) -> frozenset[int]:
        return frozenset(s.port for s in self.scheduler.servers.values() if getattr(s, "port", None))

    def _argv(self, profile: Profile, listen: int | str) -> list[str]:
        """The server's command line with what its [memory] table derives for this card (exact KV
        bytes, CUDA-graph capture size, a share that passes vLLM's start check): the preflight's
        footprint, else one from what is on disk (never the hub: this runs on the event loop)."""
        from mmlib.guard import checks

        spec = self._spec.result() if self._spec is not None and self._spec.done() else None
        return checks.argv_builder(self._card(), spec, known=self.preflight.footprint)(profile, listen)

    def _predict(self, profile: Profile, capacity: int) -> Footprint | None:
        """What a profile never seen running will hold: the preflight's estimate from its model's
        shapes (worked out in a thread; read here, on the event loop, never computed)."""
        fp = self.preflight.footprint(profile)
        return fp.footprint if fp and fp.awake_bytes else None

    # --- control API -------------------------------------------------------------------------------
    async def _args(self, request: Request) -> dict:
        if not bearer_ok(request.headers.get("authorization"), self.config.api_key):
            raise PermissionError("missing or wrong API key")
        raw = await request.body()
        doc = json.loads(raw) if raw else {}
        if not isinstance(doc, dict):
            raise ValueError("the body must be a JSON object")
        return doc

    async def _call(self, request: Request, action) -> JSONResponse:
        try:
            args = await self._args(request)
            result = await action(args)
        except PermissionError as e:
            return JSONResponse({"error": str(e)}, status_code=401)
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
        except Refused as e:  # the checks' line; nothing was slept or stopped
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except MMError as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        except Exception as e:  # a bug or an outside failure: one line to the caller, the trace to the log
            log.exception("control API %s failed", request.url.path)
            return JSONResponse({"error": f"{type(e).__name__}: {e} (see {paths.daemon_log()})"},
                                status_code=500)
        return JSONResponse(result)

    async def ping(self, request: Request) -> JSONResponse:
        return await self._call(request, lambda a: self._ping())

    async def _ping(self) -> dict:
        return {"pid": os.getpid(), "proxy": self.config.proxy_url, "started_at": self.started_at,
                "shutting_down": self.scheduler.closed}

    async def status(self, request: Request) -> JSONResponse:
        return await self._call(request, lambda a: self._status())

    async def _status(self) -> dict:
        servers = []  # (pynvml is initialised once, on the first status)
        for s in list(self.scheduler.servers.values()):  # a server may be added while this awaits
            snap = s.snapshot()
            snap["memory"] = await asyncio.to_thread(s.memory)
            snap["waiting"] = self.scheduler.waiting(s.name)
            snap.update(self.scheduler.start_status(s.name))  # failed starts: backoff, FATAL
            servers.append(snap)
        memory, mib = self.scheduler.memory, lambda n: round(n / 2**20) if n else None
        capacity = memory.capacity()
        # bytes for scripts; MiB and the GPU's name for the page
        card = {"capacity": capacity, "free": memory.free(), "budget": memory.budget,
                "total_mib": mib(capacity), "budget_mib": mib(memory.budget), "name": memory.name()}
        devices = await asyncio.to_thread(memory.devices)
        return {"daemon": await self._ping(), "active": self.scheduler.active, "card": card,
                "cards": cards.status(devices, servers, memory.budget),
                "last_switch_s": self.scheduler.last_switch_s,
                "switches_per_min": self.scheduler.switches_per_minute(), "servers": servers,
                "background_errors": list(self.background_errors.values()),
                "ram_budget": await self.scheduler.ram_budget_read()}

    def _profile(self, args: dict) -> Profile:
        name = args.get("profile") or self.config.default_profile
        if not isinstance(name, str):
            raise ValueError("profile must be a string")
        profile = load_profile(name)
        if args.get("model"):
            if profile.is_stack:
                raise MMError(f"{name} is a stack; a model can only replace a single server's model")
            profile = profile.with_model(str(args["model"]))
        return profile

    async def _activate(self, args: dict) -> dict:
        profile = self._profile(args)
        self.index.refresh()
        if args.get("force") is True:  # `mm up --force`: start it whatever the checks say
            for member in self.scheduler.members(profile):
                self.preflight.force(member)
        t0 = time.perf_counter()
        servers = await self.scheduler.activate(profile)
        return {"servers": [s.snapshot() for s in servers], "switch_s": time.perf_counter() - t0,
                "proxy": self.config.proxy_url}

    async def up(self, request: Request) -> JSONResponse:
        return await self._call(request, self._activate)

    switch = wake = up  # the same request: make this profile answer

    def _existing(self, args: dict) -> str | None:
        name = args.get("profile")
        if name is None:
            return None
        if name not in self.scheduler.servers:
            raise MMError(f"{name} is not running (see `mm status`)")
        return name

    async def sleep(self, request: Request) -> JSONResponse:
        return await self._call(request, self._sleep)

    async def _sleep(self, args: dict) -> dict:  # also the page's sleep button
        level, checkpoint = args.get("level"), args.get("checkpoint", False)
        if level is not None and level not in (1, 2):
            raise ValueError("level must be 1 or 2")
        if not isinstance(checkpoint, bool):
            raise ValueError("checkpoint must be true or false")
        name = self._existing(args)
        if checkpoint and name is None:
            raise ValueError("checkpoint needs a profile")
        await self.scheduler.sleep(name, level)
        if checkpoint:  # also off the card: the CUDA driver's process checkpoint
            await self.scheduler.servers[name].checkpoint()
        return await self._status()

    async def stop(self, request: Request) -> JSONResponse:
        return await self._call(request, self._stop)

    async def _stop(self, args: dict) -> dict:  # also the page's stop button
        stopped = await self.scheduler.stop(None if args.get("all") else self._existing(args))
        return {"stopped": stopped}

    async def shutdown(self, request: Request) -> JSONResponse:
        async def act(args):
            self.scheduler.closed = True  # from now on, no new work: nothing starts behind our back
            asyncio.get_running_loop().call_later(0.05, self.stopping.set)
            return {"stopping": True, "pid": os.getpid()}
        return await self._call(request, act)

    # --- background duties -------------------------------------------------------------------------
    # --- what each profile was measured to hold, kept across daemon restarts --------------------------
    def load_footprints(self) -> None:
        try:
            saved = json.loads(footprints_path().read_text())
            # (a row without "sizing", from before it was kept, matches no profile: measured again)
            self.scheduler.footprints = {(name, model or None, f.get("sizing", "")):
                                         Footprint(f["awake"], f["asleep"], measured=True) for name, model, f in saved}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or unreadable: measured again as servers run

    def save_footprints(self) -> None:
        rows = [[name, model, {"awake": f.awake, "asleep": f.asleep, "sizing": sizing}]
                for (name, model, sizing), f in sorted(self.scheduler.footprints.items(), key=str) if f.measured]
        text = json.dumps(rows)
        if text != self._saved_footprints:
            replace_atomic(footprints_path(), text, mode=0o600)
            self._saved_footprints = text

    async def idle_loop(self) -> None:
        """The background duties, once a second for the daemon's life: a duty that fails is logged
        (one line, with its server) and tried again next round, and shows in status meanwhile."""
        while True:
            await self.scheduler.clock.sleep(IDLE_CHECK_S)
            await self.idle_round()

    async def idle_round(self) -> None:
        self._duties_run = set()
        await self._duty("save footprints", None, self.save_footprints)
        now = self.scheduler.clock.now()
        for s in list(self.scheduler.servers.values()):
            # the awake peak and the asleep residue, for room decisions
            await self._duty("measure", s.name, lambda: self.scheduler.measure(s))
            idle = now - s.last_used
            p = s.profile
            if s.in_flight or self.scheduler.waiting(s.name) or self.scheduler.closed:
                continue
            if p.idle_stop and s.state in (State.AWAKE, State.ASLEEP, State.CHECKPOINTED) and idle > p.idle_stop:
                log.info("%s idle %.0f s: stopping", s.name, idle)
                await self._duty("idle stop", s.name, lambda: self.scheduler.stop(s.name))
            elif p.idle_sleep and s.state == State.AWAKE and idle > p.idle_sleep:
                log.info("%s idle %.0f s: sleeping", s.name, idle)
                await self._duty("idle sleep", s.name, lambda: self.scheduler.sleep(s.name))
        await self._duty("keep RAM", None, self.scheduler.keep_ram)  # other programs may take it too
        for key in set(self.background_errors) - self._duties_run:  # no longer due: nothing to show
            del self.background_errors[key]

    async def _duty(self, what: str, server: str | None, act) -> None:
        """One background duty; its failure is kept for status (cleared once it succeeds again) and
        logged once per streak, not once a second."""
        key = f"{server}: {what}" if server else what
        self._duties_run.add(key)
        try:
            result = act()
            if asyncio.iscoroutine(result):
                await result
        except Exception as e:
            line = str(e).splitlines()[0] if str(e) else type(e).__name__
            failed = self.background_errors.get(key, {"count": 0, "error": None})
            if failed["error"] != line:
                log.warning("%s failed: %s (tried again every %.0f s; see `mm status`)", key, line, IDLE_CHECK_S)
            self.background_errors[key] = {"server": server, "duty": what, "error": line,
                                           "at": time.time(), "count": failed["count"] + 1}
        else:
            self.background_errors.pop(key, None)

    async def adopt_orphans(self) -> None:
        """Servers a previous daemon started (it may have been killed): take them back or stop them."""
        for f, record in records.read_all():
            try:
                if record is None:
                    raise ValueError("not a server record")
                profile = load_profile(record["profile"])
                if record.get("model") and record["model"] != profile.model:
                    profile = profile.with_model(record["model"])
            except (ValueError, KeyError, TypeError, MMError) as e:
                log.warning("server record %s unusable (%s); stopping its process", f, e)
                records.stop_recorded(f, record)
                continue
            server = self.make_server(profile)
            server.on_death = self.scheduler.on_death  # a death while it is being adopted
            if await server.adopt(record):
                self.scheduler.adopt(server)
                if server.state == State.AWAKE:
                    self.scheduler.active = [profile.name]
                log.info("adopted %s (pid %s, %s)", profile.name, server.pid, server.state.value)
            else:
                records.stop_recorded(f, record)
        # Their footprints until they are measured (the scheduler reads only what the checks found).
        self.preflight.check_soon([s.profile for s in self.scheduler.servers.values()])

    async def stop_everything(self) -> None:
        await self.scheduler.close()


@contextlib.contextmanager
def single_instance():
    """One daemon per user: an exclusive lock held for the daemon's life."""
    lock_path = paths.state_dir() / "daemon.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode().strip()
        os.close(fd)
        raise MMError(f"an mm daemon is already running (pid {other or '?'}); `mm daemon stop` ends it") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        os.close(fd)


def _load_spec():
    from mmlib.profiles.vllm_args import SpecUnavailable, load_spec

    try:
        return load_spec()
    except SpecUnavailable as e:
        log.warning("vLLM's arguments unknown (servers listen on TCP ports): %s", e)
        return None


def _uvicorn(app, **where) -> QuietServer:
    kw = dict(log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=30)
    with contextlib.suppress(ImportError):
        import httptools  # noqa: F401
        kw["http"] = "httptools"
    return QuietServer(uvicorn.Config(app, **kw, **where))


def bind_proxy(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then, and
    # without it every keep-alive response waits 40 ms for the client's delayed ACK.
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise MMError(f"the proxy cannot listen on {host}:{port} ({e.strerror}); set proxy_port in "
                      f"{paths.config_dir() / 'config.toml'} or MM_PROXY_PORT to a free port") from None
    s.listen(2048)
    return s


def bind_control(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX)
    old = os.umask(0o177)  # created 0600: no other user of the machine can drive the daemon
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    s.listen(128)
    return s


async def serve(config: Config) -> None:
    proxy_sock = bind_proxy(config.proxy_host, config.proxy_port)
    path = paths.daemon_socket()
    control_sock = bind_control(path)
    daemon = Daemon(config)
    control, proxy = _uvicorn(daemon.control), _uvicorn(daemon.proxy.app)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, daemon.stopping.set)
    daemon.load_footprints()
    # The driver asked (its cuInit) off the loop; `warm` keeps the task referenced while the daemon runs.
    warm = asyncio.ensure_future(asyncio.to_thread(daemon.checkpoint_driver))
    await daemon.adopt_orphans()
    asyncio.ensure_future(daemon._vllm_spec())  # read once now: the first request's checks need it
    tasks = [asyncio.create_task(control.serve(sockets=[control_sock])),
             asyncio.create_task(proxy.serve(sockets=[proxy_sock])),
             asyncio.create_task(daemon.idle_loop())]
    print(f"mm daemon: pid {os.getpid()}, proxy {config.proxy_url}, control {path}", flush=True)
    await daemon.stopping.wait()
    log.info("stopping all servers")
    await daemon.stop_everything()
    control.should_exit = proxy.should_exit = True
    await asyncio.gather(*tasks[:2], return_exceptions=True)
    tasks[2].cancel()
    await daemon.proxy.close()
    path.unlink(missing_ok=True)


def run() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health probe
    config = load_config()
    runner = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # the proxy relays every streamed chunk: uvloop halves that cost

        runner = uvloop.run
    with single_instance():
        runner(serve(config))
