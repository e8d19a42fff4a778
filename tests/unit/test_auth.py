"""The one key check and the Host guard against DNS rebinding, driven as ASGI apps."""
from __future__ import annotations

import asyncio

from mmlib.serve.auth import bearer_ok, host_guard, host_name


def test_host_names_lose_their_ports():
    assert host_name("localhost:8000") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("Evil.Example:80") == "evil.example"


def test_bearer_check():
    assert bearer_ok(None, None) and bearer_ok("Bearer k", "k")
    assert not bearer_ok(None, "k") and not bearer_ok("Bearer x", "k")


def call(app, host: str | None) -> int:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    headers = [(b"host", host.encode())] if host is not None else []
    asyncio.run(app({"type": "http", "method": "GET", "path": "/v1/models", "headers": headers}, receive, send))
    return sent[0]["status"]


async def ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_without_a_key_only_names_of_this_machine_are_served():
    app = host_guard(ok_app, None, "127.0.0.1")
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert call(app, host) == 200, host
    assert call(app, "attacker.example:8000") == 403  # a rebinding page's own name
    assert call(app, None) == 200  # HTTP/1.0 clients send none


def test_the_address_mm_listens_on_is_allowed_and_a_key_lifts_the_guard():
    assert call(host_guard(ok_app, None, "192.168.1.5"), "192.168.1.5:8000") == 200
    assert call(host_guard(ok_app, "k", "0.0.0.0"), "workstation.lan:8000") == 200  # the key guards instead
