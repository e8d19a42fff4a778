"""The stable OpenAI endpoint: route each request by its `model` to that profile's server.

The request path is kept short because it is the hot path: one JSON parse of the body to read
`model`, then bytes pass through unchanged (re-serialized only when `model` must be rewritten,
e.g. "default"). Streaming responses are relayed chunk by chunk; a client that goes away closes the
upstream connection, which makes vLLM abort the request.
"""
from __future__ import annotations

import json
import re
import time
from typing import AsyncIterator, Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mmlib.errors import MMError
from mmlib.profiles import Profile
from mmlib.scheduler import Scheduler
from mmlib.states import State

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length", "host", "proxy-authorization", "proxy-authenticate"}
DEFAULT_NAMES = ("", "default")
MULTIPART_MODEL = re.compile(rb'name="model"\r\n\r\n([^\r\n]*)\r\n')


def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None,
          **extra) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, **extra}}, status_code=status,
                        headers=headers)


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
                 api_key: str | None = None):
        self.scheduler, self.index, self.default_profile = scheduler, index, default_profile
        self.api_key = api_key
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/{path:path}", self.forward, methods=["POST"]),
        ])

    def authorized(self, request: Request) -> bool:
        return not self.api_key or request.headers.get("authorization") == f"Bearer {self.api_key}"

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        if not self.authorized(request):
            return error(401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error")
        self.index.refresh()
        data = []
        for p in self.index.profiles:
            server = self.scheduler.servers.get(p.name)
            state = server.state.value if server else State.STOPPED.value
            data.append({"id": p.served_model_name, "object": "model", "created": 0, "owned_by": "mm",
                         "mm": {"profile": p.name, "state": state, "aliases": list(p.aliases),
                                "model": p.model}})
        return JSONResponse({"object": "list", "data": data})

    def resolve(self, model: str | None) -> Profile | None:
        if model in DEFAULT_NAMES or model is None:
            if self.scheduler.active:
                server = self.scheduler.servers[self.scheduler.active[-1]]
                return server.profile
            return self.default_profile()
        return self.index.lookup(model)

    async def forward(self, request: Request) -> Response:
        if not self.authorized(request):
            return error(401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error")
        body = await request.body()
        try:
            model, doc = request_model(body, request.headers.get("content-type", ""))
        except (ValueError, UnicodeDecodeError) as e:
            return error(400, f"malformed request body: {e}")
        profile = self.resolve(model)
        if profile is None:
            known = sorted(self.index.by_name)
            return error(404, f"unknown model {model!r}; known models: {', '.join(known)}",
                         "model_not_found", known_models=known)
        try:
            server = await self.scheduler.acquire(profile)
        except MMError as e:
            return error(503, str(e), "server_unavailable", headers={"Retry-After": "5"})
        if doc is not None and model in DEFAULT_NAMES and "model" in doc:
            doc["model"] = server.profile.served_model_name
            body = json.dumps(doc).encode()
        return await self.relay(request, server, body)

    async def relay(self, request: Request, server, body: bytes) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        if server.profile.api_key:
            headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
            headers.append(("authorization", f"Bearer {server.profile.api_key}"))
        url = f"{server.url}{request.url.path}"
        if request.url.query:
            url += f"?{request.url.query}"
        upstream_req = self.client.build_request("POST", url, content=body, headers=headers)
        try:
            upstream = await self.client.send(upstream_req, stream=True)
        except httpx.HTTPError as e:
            server.release()
            return error(502, f"{server.name}: upstream failed: {e}", "upstream_error", headers={"Retry-After": "5"})
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            out_headers["x-accel-buffering"] = "no"  # no buffering proxy in between, please
        return StreamingResponse(self._relay_body(upstream, server), status_code=upstream.status_code,
                                 headers=out_headers)

    @staticmethod
    async def _relay_body(upstream: httpx.Response, server) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            # The server died mid-answer: end the stream with an error event the client can show.
            yield f'\n\ndata: {{"error": {{"message": "{server.name}: upstream connection lost ({type(e).__name__})"}}}}\n\n'.encode()
        finally:
            await upstream.aclose()
            server.release()
            server.last_used = time.monotonic()
