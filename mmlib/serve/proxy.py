"""The stable OpenAI endpoint: route each request by its `model` to that profile's server.

The request path is kept short because it is the hot path: one JSON parse of the body to read
`model`, then bytes pass through unchanged (re-serialized only when `model` must be rewritten,
e.g. "default"). Streaming responses are relayed chunk by chunk; a client that goes away closes the
upstream connection at once (also while vLLM is silent, e.g. its answer paused by a switch), which
makes vLLM abort the request and frees its place on the server.

Nothing is started or switched for a request that cannot be served: one its model does not answer
at that endpoint (a chat for Whisper) gets a 400 naming the endpoint that would, and a start the
checks refuse (guard/preflight) gets a 4xx with their line; what runs stays untouched.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from typing import Callable

import aiohttp
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mmlib.errors import MMError, Refused
from mmlib.guard.preflight import Preflight, misdirected
from mmlib.profiles.profile import Profile
from mmlib.serve.auth import bearer_ok
from mmlib.serve.metrics import Metrics
from mmlib.serve.scheduler import Scheduler
from mmlib.serve.states import LIVE, State

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length", "host", "proxy-authorization", "proxy-authenticate"}
DEFAULT_NAMES = ("", "default")
log = logging.getLogger("mm.proxy")
MULTIPART_MODEL = re.compile(rb'name="model"\r\n\r\n([^\r\n]*)\r\n')


def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None,
          **extra) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None, **extra}},
                        status_code=status, headers=headers)


class ModelIndex:
    """Model name (served name or alias) -> profile, rebuilt when a lookup misses."""

    def __init__(self, load_all: Callable[[], tuple[list[Profile], list]]):
        self._load_all = load_all
        self.by_name: dict[str, Profile] = {}
        self.profiles: list[Profile] = []
        self.refresh()

    def refresh(self) -> None:
        profiles, _errors = self._load_all()
        self.profiles = [p for p in profiles if not p.is_stack]
        self.by_name = {}
        for p in self.profiles:
            for n in p.names:
                self.by_name.setdefault(n, p)

    def lookup(self, name: str) -> Profile | None:
        p = self.by_name.get(name)
        if p is None:
            self.refresh()
            p = self.by_name.get(name)
        return p


def request_model(body: bytes, content_type: str) -> tuple[str | None, dict | None]:
    """The `model` of a request, and the parsed JSON body when it was JSON."""
    if content_type.startswith("multipart/form-data"):  # audio transcription uploads
        m = MULTIPART_MODEL.search(body)
        return (m.group(1).decode(errors="replace") if m else None), None
    if not body:
        return None, None
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("the body must be a JSON object")
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError("`model` must be a string")
    return model, doc


class Proxy:
    def __init__(self, scheduler: Scheduler, index: ModelIndex, default_profile: Callable[[], Profile],
                 api_key: str | None = None, upstream_timeout: float = 600.0, max_body: int = 100 * 2**20,
                 metrics: Metrics | None = None, guard: Preflight | None = None):
        self.scheduler, self.index, self.default_profile = scheduler, index, default_profile
        self.guard = guard  # what each model serves, and which cannot start here
        self.api_key = api_key
        self.upstream_timeout, self.max_body = upstream_timeout, max_body
        self.metrics = metrics or Metrics()
        self._sessions: dict[str | None, aiohttp.ClientSession] = {}
        self.routes = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])
        self.app = self

    def session(self, uds: str | None = None) -> aiohttp.ClientSession:
        """aiohttp for the upstream leg: its C parser costs a third of what httpx does per request and
        per streamed chunk, which is the difference between ~1.1 ms and ~0.4 ms added latency here.
        One pooled session for TCP servers, one per unix socket. A model silent for upstream_timeout
        (a hung engine) ends the request instead of holding a switch."""
        session = self._sessions.get(uds)
        if session is None or session.closed:
            connector = aiohttp.UnixConnector(path=uds, limit=0, keepalive_timeout=30) if uds else \
                aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            session = self._sessions[uds] = aiohttp.ClientSession(
                connector=connector, auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=self.upstream_timeout))
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()

    def authorized(self, request: Request) -> bool:
        return bearer_ok(request.headers.get("authorization"), self.api_key)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        if not self.authorized(request):
            return error(401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error")
        self.index.refresh()
        # What cannot start here is not offered (a client would pick it and get an error); it is
        # listed apart, with why, for people and scripts.
        refused = await self.guard.unavailable(self.index.profiles) if self.guard else {}
        data, unavailable = [], []
        for p in self.index.profiles:
            server = self.scheduler.servers.get(p.name)
            state = server.state.value if server else State.STOPPED.value
            mm = {"profile": p.name, "state": state, "aliases": list(p.aliases), "model": p.model}
            if p.name in refused and (server is None or server.state not in LIVE):
                unavailable.append({"id": p.served_model_name, "mm": {**mm, "why": refused[p.name]}})
                continue
            data.append({"id": p.served_model_name, "object": "model", "created": 0, "owned_by": "mm", "mm": mm})
        if self.guard:
            self.guard.check_soon(self.index.profiles)  # the full checks, for the next listing
        return JSONResponse({"object": "list", "data": data, "mm_unavailable": unavailable})

    def resolve(self, model: str | None) -> Profile | None:
        if model in DEFAULT_NAMES or model is None:
            if self.scheduler.active:
                server = self.scheduler.servers[self.scheduler.active[-1]]
                return server.profile
            return self.default_profile()
        for server in self.scheduler.servers.values():  # a model given on the command line (`mm chat ORG/M`)
            if server.state in LIVE and model in server.profile.names:
                return server.profile
        return self.index.lookup(model)

    # --- the hot path: plain ASGI, no middleware stack or per-response task group ----------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            await self.forward(scope, receive, send)
        else:
            await self.routes(scope, receive, send)

    async def forward(self, scope, receive, send) -> None:
        headers = Headers(scope=scope)
        if not bearer_ok(headers.get("authorization"), self.api_key):
            return await error(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                               "authentication_error")(scope, receive, send)
        try:
            body = await read_body(receive, self.max_body)
        except BodyTooLarge:
            return await error(413, f"request body over {self.max_body // 2**20} MiB (max_body_mib in "
                                    f"config.toml)")(scope, receive, send)
        if body is None:
            return  # the client left while sending
        try:
            model, doc = request_model(body, headers.get("content-type", ""))
        except (ValueError, UnicodeDecodeError) as e:
            return await error(400, f"malformed request body: {e}")(scope, receive, send)
        profile = self.resolve(model)
        if profile is None:
            known = sorted(self.index.by_name)
            return await error(404, f"unknown model {model!r}; known models: {', '.join(known)}",
                               "model_not_found", known_models=known)(scope, receive, send)
        wrong = await self._misdirected(profile, scope["path"], doc)
        if wrong:
            return await error(400, wrong)(scope, receive, send)
        meter = self.metrics.request(profile.name, scope["path"], doc, body)  # metrics (issue 14)
        body, send = meter.body, meter.wrap(send)  # metrics: may ask for a stream's usage
        # From here on a client that goes away must free what it holds: its place in a switch's
        # queue, the server's count, the upstream request (vLLM aborts it when the connection drops).
        gone = asyncio.ensure_future(receive())
        try:
            with meter.queued():  # metrics: queue wait
                server = await self._acquire(profile, gone)
            if server is None:
                return
            try:
                if doc is not None and model in DEFAULT_NAMES and "model" in doc:
                    doc["model"] = server.profile.served_model_name
                    body = json.dumps(doc).encode()
                await self.relay(scope, send, server, headers, body, gone)
            finally:
                server.release()
                server.last_used = time.monotonic()
        except _Unavailable as e:
            await e.response(scope, receive, send)
        finally:
            gone.cancel()
            meter.done()  # metrics

    async def _misdirected(self, profile: Profile, path: str, doc: dict | None) -> str | None:
        """Why this model cannot answer at `path` (None: it can, or what it serves is unknown)."""
        if self.guard is None:
            return None
        what = self.guard.serves_known(profile) or await self.guard.serves(profile)
        return misdirected(what, profile.served_model_name, path, doc)

    async def _acquire(self, profile: Profile, gone: asyncio.Future):
        """The server for this request, or None when the client left while it waited."""
        acquiring = asyncio.ensure_future(self.scheduler.acquire(profile))
        await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not acquiring.done():
            acquiring.cancel()  # the scheduler gives its place back
            with contextlib.suppress(asyncio.CancelledError, MMError):
                await acquiring
            return None
        try:
            return acquiring.result()
        except Refused as e:  # the checks' line, at once: nothing was slept or stopped for it
            raise _Unavailable(str(e), e.status, "invalid_request_error") from None
        except MMError as e:
            raise _Unavailable(str(e), retry_after_s=getattr(e, "retry_after_s", None) or 5) from None
        except Exception as e:  # an outside failure while switching: one line, never a traceback
            log.exception("switching to %s failed", profile.name)
            raise _Unavailable(f"{profile.name}: could not make it ready ({type(e).__name__}: {e})") from None

    async def relay(self, scope, send, server, headers: Headers, body: bytes, gone: asyncio.Future) -> None:
        out = [(k, v) for k, v in headers.items() if k not in HOP_BY_HOP]
        if server.profile.api_key:
            out = [(k, v) for k, v in out if k != "authorization"]
            out.append(("authorization", f"Bearer {server.profile.api_key}"))
        url = server.url + scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        posting = asyncio.ensure_future(self.session(server.uds).post(url, data=body, headers=out))
        await asyncio.wait({posting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not posting.done():  # a non-streaming answer still being made, and nobody left to read it
            posting.cancel()
            with contextlib.suppress(BaseException):
                await posting
            return
        try:
            upstream = posting.result()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise _Unavailable(f"{server.name}: upstream failed: {e!r}", 502, "upstream_error") from None

        def hang_up(_: asyncio.Future) -> None:  # the client left: even while vLLM sends nothing
            upstream.close()  # vLLM aborts the request; the loop below ends and the count is released
        gone.add_done_callback(hang_up)
        try:
            if upstream.status == 404 and "json" not in upstream.headers.get("content-type", ""):
                # vLLM's bare 404 for an endpoint this server lacks (embeddings from a chat model)
                raise _Unavailable(f"{server.profile.served_model_name} does not answer {scope['path']} "
                                   "(its vLLM server has no such endpoint)", 404, "invalid_request_error")
            response_headers = [(k.encode(), v.encode()) for k, v in upstream.headers.items()
                                if k.lower() not in HOP_BY_HOP]
            event_stream = upstream.headers.get("content-type", "").startswith("text/event-stream")
            if event_stream:
                response_headers.append((b"x-accel-buffering", b"no"))  # no buffering proxy in between
            await send({"type": "http.response.start", "status": upstream.status, "headers": response_headers})
            try:
                async for chunk in upstream.content.iter_any():
                    if gone.done():
                        upstream.close()  # drop the connection: vLLM aborts the request
                        return
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                if gone.done():
                    return  # we hung up: nobody is left to tell
                if not event_stream:
                    raise  # a plain body cannot carry an error: drop the connection, the client sees it
                # The server died (or hung) mid-answer: end the event stream with an error the client can show.
                msg = json.dumps({"error": {"message": f"{server.name}: upstream connection lost ({type(e).__name__})"}})
                await send({"type": "http.response.body", "body": f"\n\ndata: {msg}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.remove_done_callback(hang_up)
            upstream.release()


class _Unavailable(Exception):
    """The request cannot be served now: answered with this status and Retry-After."""

    def __init__(self, message: str, status: int = 503, kind: str = "server_unavailable", retry_after_s: int = 5):
        super().__init__(message)
        self.status, self.kind, self.retry_after_s = status, kind, retry_after_s

    def response(self, scope, receive, send):
        # a 4xx is the same next time; a start in backoff says when it tries again
        retry = {"Retry-After": str(self.retry_after_s)} if self.status >= 500 else None
        return error(self.status, str(self), self.kind, headers=retry)(scope, receive, send)


class BodyTooLarge(Exception):
    pass


async def read_body(receive, limit: int) -> bytes | None:
    """The whole request body; None when the client disconnected first."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)
