"""Load across switches: 200 concurrent requests over two models, none lost, none misrouted."""
from __future__ import annotations

import asyncio
import random

import httpx


def test_200_concurrent_requests_over_two_models_across_switches(fake_mm):
    fake_mm.add_profile("model-a", extra="")
    fake_mm.add_profile("model-b", extra="")
    fake_mm.mm("up", "model-a", "--force")
    rng = random.Random(7)
    asked = [rng.choice(["model-a", "model-b"]) for _ in range(200)]

    async def one(client, i):
        stream = i % 3 == 0
        r = await client.post(f"{fake_mm.proxy}/v1/chat/completions", json={
            "model": asked[i], "max_tokens": 4, "stream": stream,
            "messages": [{"role": "user", "content": str(i)}]})
        if stream:
            return r.status_code, asked[i] if f'"model": "{asked[i]}"' in r.text else r.text
        return r.status_code, r.json().get("model", r.text)

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=300)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    results = asyncio.run(run())
    assert [code for code, _ in results] == [200] * 200
    assert [model for _, model in results] == asked  # each answered by the model it asked for
    for profile in ("model-a", "model-b"):
        assert "request-while-asleep" not in fake_mm.calls(profile)
