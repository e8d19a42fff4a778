"""The one API-key check, for the OpenAI endpoint and the control API alike."""
from __future__ import annotations

import hmac


def bearer_ok(authorization: str | None, api_key: str | None) -> bool:
    """True when no key is set, or the Authorization header carries it (compared in constant time)."""
    if not api_key:
        return True
    expected = f"Bearer {api_key}".encode()
    return hmac.compare_digest((authorization or "").encode(), expected)
