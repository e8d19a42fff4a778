"""The live page at the proxy's root, its JSON and event-stream API, and /metrics.

Mounted in front of the proxy (Page.around): `/`, `/metrics`, `/mm/...` are answered here, the rest
goes to the proxy unchanged. The page itself and its static files hold no data and are served to
anyone who can reach the port; everything with data (/metrics, /mm/api/..., /mm/results/...) asks
for the API key when one is set. Nothing the page loads comes from outside 127.0.0.1.

Status comes from the daemon's own status function and actions go through the daemon's own
handlers, so the page shows and does exactly what `mm status`, `mm wake`, `mm sleep`, `mm stop` do.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mmlib import paths
from mmlib.errors import MMError
from mmlib.profiles.profile import NAME_RE, Profile, load_all
from mmlib.serve.auth import bearer_ok
from mmlib.serve.metrics import CONTENT_TYPE, Metrics
from mmlib.system.files import tail_lines

log = logging.getLogger("mm.page")
STATIC = Path(__file__).resolve().parent / "static"
PAGE_PATHS = ("/mm/",)
STATUS_EVERY_S = 2.0       # the event stream sends the status this often (memory moves slowly)
EVENTS_COALESCE_S = 0.25   # under load, requests are sent in batches at most this often
ACTION_WAIT_S = 2.0        # a wake that takes longer answers 202; its end arrives as an event
PROFILES_FRESH_S = 5.0
LOG_LINES_MAX = 1000
RESULT_TYPES = {".json": "application/json", ".md": "text/markdown; charset=utf-8", ".png": "image/png",
                ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8", ".csv": "text/csv; charset=utf-8"}
RESULTS_LISTED = 2000
NO_STORE = {"cache-control": "no-store"}

StatusFn = Callable[[], Awaitable[dict[str, Any]]]
ActionFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Page:
    def __init__(self, status: StatusFn, actions: dict[str, ActionFn], metrics: Metrics,
                 api_key: str | None = None, profiles: Callable[[], list[Profile]] = lambda: load_all()[0],
                 stopping: asyncio.Event | None = None):
        self.status, self.actions, self.metrics = status, actions, metrics
        self.api_key = api_key
        self.stopping = stopping or asyncio.Event()  # set: event streams end (the daemon waits for them)
        self._load_profiles = profiles
        self._profiles: tuple[float, list[Profile]] = (0.0, [])
        self._footprints: dict[str, dict[str, dict]] = {}
        self._tasks: set[asyncio.Task] = set()
        self.routes = Starlette(routes=[
            Route("/", self.index, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Mount("/mm/static", StaticFiles(directory=STATIC)),
            Route("/mm/api/status", self.api_status, methods=["GET"]),
            Route("/mm/api/events", self.api_events, methods=["GET"]),
            Route("/mm/api/logs/{profile}", self.api_logs, methods=["GET"]),
            Route("/mm/api/{action:str}/{profile}", self.api_action, methods=["POST"]),
            Route("/mm/api/results", self.api_results, methods=["GET"]),
            Route("/mm/api/results/html/{path:path}", self.api_result_html, methods=["GET"]),
            Route("/mm/results/{path:path}", self.result_file, methods=["GET"]),
        ])

    def around(self, proxy: Callable) -> Callable:
        """An ASGI app that answers the page's paths and hands everything else to the proxy."""
        routes = self.routes

        async def app(scope, receive, send) -> None:
            path = scope.get("path", "")
            if scope["type"] == "http" and (path == "/" or path == "/metrics" or path.startswith(PAGE_PATHS)):
                await routes(scope, receive, send)
            else:
                await proxy(scope, receive, send)
        return app

    def authorized(self, request: Request) -> bool:
        return bearer_ok(request.headers.get("authorization"), self.api_key)

    # --- the page ---------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=NO_STORE)

    async def prometheus(self, request: Request) -> Response:
        if not self.authorized(request):
            return denied()
        return Response(await self.metrics.scrape(), media_type=CONTENT_TYPE)

    # --- status and events ------------------------------------------------------------------------
    def profiles(self) -> list[Profile]:
        loaded_at, profiles = self._profiles
        if time.monotonic() - loaded_at > PROFILES_FRESH_S:
            profiles = self._load_profiles()
            self._profiles = (time.monotonic(), profiles)
        return profiles

    async def page_status(self) -> dict[str, Any]:
        status = await self.status()
        for s in status.get("servers", []):  # what each server holds awake and asleep, as last seen
            if s.get("memory") and s["state"] in ("awake", "asleep"):
                self._footprints.setdefault(s["profile"], {})[s["state"]] = s["memory"]
        return {**status, "now": time.time(), "waiting": dict(self.metrics.waiting),
                "profiles": [profile_card(p) for p in self.profiles()],
                "footprints": self._footprints, "results_dir": str(paths.results_dir())}

    async def api_status(self, request: Request) -> Response:
        if not self.authorized(request):
            return denied()
        return JSONResponse(await self.page_status(), headers=NO_STORE)

    async def api_events(self, request: Request) -> Response:
        """Server-sent events: a snapshot (status and the last hour's events), then new events as
        they happen and the status every STATUS_EVERY_S. The page reads it through fetch, which,
        unlike EventSource, can send the API key."""
        if not self.authorized(request):
            return denied()
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            return JSONResponse({"error": "after must be an event number"}, status_code=400)
        headers = {**NO_STORE, "x-accel-buffering": "no"}
        return StreamingResponse(self._event_stream(after), media_type="text/event-stream", headers=headers)

    async def _event_stream(self, after: int) -> AsyncIterator[bytes]:
        events = self.metrics.events
        waiter = events.waiter()
        try:
            batch = events.after(after)
            yield sse("snapshot", {"status": await self.page_status(), "events": batch,
                                   "seq": events.last_seq})
            seq, next_status = events.last_seq, time.monotonic() + STATUS_EVERY_S
            while not self.stopping.is_set():
                await first_of(waiter, self.stopping, timeout=max(0.0, next_status - time.monotonic()))
                waiter.clear()
                batch = events.after(seq)
                if batch:
                    seq = batch[-1]["seq"]
                    yield sse("events", batch)
                if time.monotonic() >= next_status or any(e["kind"] != "request" for e in batch):
                    yield sse("status", await self.page_status())
                    next_status = time.monotonic() + STATUS_EVERY_S
                await asyncio.sleep(EVENTS_COALESCE_S)
        finally:
            events.forget(waiter)

    # --- actions ----------------------------------------------------------------------------------
    async def api_action(self, request: Request) -> Response:
        if not self.authorized(request):
            return denied()
        if not same_origin(request):
            return JSONResponse({"error": "a page from another site may not press mm's buttons"}, status_code=403)
        action, name = request.path_params["action"], request.path_params["profile"]
        if action not in self.actions:
            return JSONResponse({"error": f"unknown action {action!r}; one of {', '.join(self.actions)}"},
                                status_code=404)
        if not NAME_RE.match(name):
            return JSONResponse({"error": f"{name!r} is not a profile name"}, status_code=400)
        task = asyncio.ensure_future(self._act(action, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        done, _ = await asyncio.wait({task}, timeout=ACTION_WAIT_S)
        if not done:
            return JSONResponse({"action": action, "profile": name, "pending": True}, status_code=202)
        ok, message = task.result()
        return JSONResponse({"action": action, "profile": name, "ok": ok, **({"error": message} if message else {})},
                            status_code=200 if ok else 409)

    async def _act(self, action: str, name: str) -> tuple[bool, str | None]:
        """Run the daemon's handler; its outcome also becomes an event (a long wake ends after the
        page's request was answered)."""
        try:
            await self.actions[action]({"profile": name})
            ok, message = True, None
        except (MMError, ValueError, KeyError, OSError) as e:
            ok, message = False, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        except Exception as e:  # noqa: BLE001 - a page button must never take the daemon down
            log.exception("page action %s %s", action, name)
            ok, message = False, f"{type(e).__name__}: {e}"
        self.metrics.events.add("action", action=action, model=name, ok=ok, error=message)
        return ok, message

    # --- logs -------------------------------------------------------------------------------------
    async def api_logs(self, request: Request) -> Response:
        if not self.authorized(request):
            return denied()
        name = request.path_params["profile"]
        try:
            lines = max(1, min(int(request.query_params.get("lines", "200")), LOG_LINES_MAX))
        except ValueError:
            return JSONResponse({"error": "lines must be a number"}, status_code=400)
        path = await self._log_path(name)
        if path is None:
            return JSONResponse({"error": f"no log for {name!r}"}, status_code=404)
        text = await asyncio.to_thread(tail_lines, path, lines, 256 * 1024)
        return JSONResponse({"profile": name, "path": str(path), "lines": text}, headers=NO_STORE)

    async def _log_path(self, name: str) -> Path | None:
        """A server's log, or the log a profile's last server left; a name never becomes a path."""
        servers = {s["profile"]: s for s in (await self.status()).get("servers", [])}
        if servers.get(name, {}).get("log"):
            return Path(servers[name]["log"])
        if name not in {p.name for p in self.profiles()} or not NAME_RE.match(name):
            return None
        path = paths.logs_dir() / f"{name}.log"
        return path if path.is_file() else None

    # --- bench and eval results (read-only) -------------------------------------------------------
    async def api_results(self, request: Request) -> Response:
        if not self.authorized(request):
            return denied()
        root = paths.results_dir()
        return JSONResponse({"root": str(root), "files": await asyncio.to_thread(list_results, root)},
                            headers=NO_STORE)

    async def result_file(self, request: Request) -> Response:
        if not self.authorized(request):
            return denied()
        path = result_path(request.path_params["path"])
        if path is None:
            return JSONResponse({"error": "no such result file"}, status_code=404)
        return FileResponse(path, media_type=RESULT_TYPES[path.suffix], headers=NO_STORE)

    async def api_result_html(self, request: Request) -> Response:
        """A markdown result (summary.md) as HTML; images point at their result file by data-result,
        which the page loads with the key."""
        if not self.authorized(request):
            return denied()
        rel = request.path_params["path"]
        path = result_path(rel)
        if path is None or path.suffix != ".md":
            return JSONResponse({"error": "no such markdown result"}, status_code=404)
        text = await asyncio.to_thread(path.read_text, errors="replace")
        return JSONResponse({"path": rel, "html": render_markdown(text, posixpath.dirname(rel))}, headers=NO_STORE)


async def first_of(*events: asyncio.Event, timeout: float) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def denied() -> Response:
    return JSONResponse({"error": "missing or wrong API key (send Authorization: Bearer <key>)"},
                        status_code=401, headers={"www-authenticate": "Bearer"})


def same_origin(request: Request) -> bool:
    """Whether a browser sent this from mm's own page. Another site's page can make the browser POST
    here too (no key needed where none is set), but then the Origin header names that site."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def profile_card(p: Profile) -> dict[str, Any]:
    return {"name": p.name, "description": p.description, "model": p.model,
            "served_model_name": p.served_model_name, "aliases": list(p.aliases), "stack": list(p.stack),
            "share_gpu": p.share_gpu, "memory_share": None if p.is_stack else p.memory_share,
            "sleep": p.sleep.enabled, "sleep_level": p.sleep.level}


def result_path(rel: str) -> Path | None:
    """The result file `rel` names, only if it lies inside the results folder (after following
    links), is a plain file and of a type the page shows."""
    root = paths.results_dir().resolve()
    if "\0" in rel or rel.startswith("/"):
        return None
    try:
        path = (root / rel).resolve()
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(root) or path.suffix not in RESULT_TYPES or not path.is_file():
        return None
    return path


def list_results(root: Path) -> list[dict[str, Any]]:
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            path = Path(dirpath) / f
            if f.startswith(".") or path.suffix not in RESULT_TYPES or result_path(str(path.relative_to(root))) is None:
                continue
            st = path.stat()
            found.append({"path": path.relative_to(root).as_posix(), "size": st.st_size, "mtime": st.st_mtime})
            if len(found) >= RESULTS_LISTED:
                return found
    return found


def render_markdown(text: str, base: str) -> str:
    from markdown_it import MarkdownIt
    from markdown_it.common.utils import escapeHtml

    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(self, tokens, idx, options, env) -> str:
        token = tokens[idx]
        src = token.attrGet("src") or ""
        alt = self.renderInlineAsText(token.children or [], options, env)
        if re.match(r"^[a-z][a-z0-9+.-]*:", src, re.I):  # nothing is fetched from elsewhere
            return f'<span class="img-missing">[{escapeHtml(alt)}]</span>'
        rel = posixpath.normpath(posixpath.join(base, src))
        return f'<img data-result="{escapeHtml(rel)}" alt="{escapeHtml(alt)}">'

    md.add_render_rule("image", image)
    return md.render(text)
