"""The one API-key check, for the OpenAI endpoint and the control API alike."""
from __future__ import annotations

import hmac

from starlette.responses import JSONResponse


def bearer_ok(authorization: str | None, api_key: str | None) -> bool:
    """True when no key is set, or the Authorization header carries it (compared in constant time)."""
    if not api_key:
        return True
    expected = f"Bearer {api_key}".encode()
    return hmac.compare_digest((authorization or "").encode(), expected)


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def host_guard(app, api_key: str | None, listen_host: str):
    """ASGI wrapper against DNS rebinding: without a key, a web page that rebinds its own name to
    127.0.0.1 could drive mm (and read its answers) from the user's browser. So, keyless, only
    requests that name this machine (loopback names, or the address mm listens on) are served;
    with a key, the key guards every request and any name may be used."""
    allowed = LOOPBACK_NAMES | {host_name(listen_host)}

    async def guarded(scope, receive, send):
        if api_key or scope["type"] != "http":
            return await app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
        if not host or host_name(host) in allowed:
            return await app(scope, receive, send)
        message = (f"Host {host!r} is not this machine: mm answers requests for localhost or 127.0.0.1 only "
                   f"(a guard against DNS rebinding; set api_key in config.toml to accept other names)")
        await JSONResponse({"error": {"message": message, "type": "forbidden_host", "code": 403}},
                           status_code=403)(scope, receive, send)
    return guarded
