"""What metering costs the proxy per request and per streamed chunk, in-process (no network, so the
figure holds on a busy machine where the end-to-end proxy benchmark is noise).

Drives mmlib.serve.metrics.RequestMeter with the ASGI messages the proxy sends: a non-streamed
answer, and a 100-chunk stream whose usage chunk mm asked for and strips. Prints microseconds per
request and per chunk next to the proxy's added latency budget (1 ms, benchmarks/proxy_overhead.py).
Run: .venv/bin/python benchmarks/metrics_overhead.py
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmlib.serve.metrics import Metrics  # noqa: E402

ROUNDS = 3000
CHUNKS = 100
JSON_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
ANSWER = json.dumps({"choices": [{"message": {"content": "tok " * 64}}],
                     "usage": {"prompt_tokens": 20, "completion_tokens": 64}}).encode()
CHUNK = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok "}}]}\n\n'
USAGE = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":20,"completion_tokens":100}}\n\n'
END = {"type": "http.response.body", "body": b"", "more_body": False}


async def sink(message: dict) -> None:
    pass


async def plain(metrics: Metrics, metered: bool) -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    send = sink
    if metered:
        meter = metrics.request("m", "/v1/chat/completions", doc, b"{}")
        send = meter.wrap(sink)
        with meter.queued():
            pass
    await send(JSON_START)
    await send({"type": "http.response.body", "body": ANSWER, "more_body": True})
    await send(END)
    if metered:
        meter.done()


async def stream(metrics: Metrics, metered: bool) -> None:
    doc = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    send = sink
    if metered:
        meter = metrics.request("m", "/v1/chat/completions", doc, json.dumps(doc).encode())
        send = meter.wrap(sink)
        with meter.queued():
            pass
    await send(SSE_START)
    for _ in range(CHUNKS):
        await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": USAGE, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
    await send(END)
    if metered:
        meter.done()


async def per_call(fn, metered: bool) -> float:
    metrics = Metrics()
    best = float("inf")
    for _ in range(5):  # best of 5, in CPU time: the least disturbed by other work on the machine
        t0 = time.process_time()
        for _ in range(ROUNDS):
            await fn(metrics, metered)
        best = min(best, (time.process_time() - t0) / ROUNDS)
    return best


async def main() -> None:
    bare_plain, metered_plain = await per_call(plain, False), await per_call(plain, True)
    bare_stream, metered_stream = await per_call(stream, False), await per_call(stream, True)
    per_request = (metered_plain - bare_plain) * 1e6
    per_chunk = ((metered_stream - bare_stream) * 1e6 - per_request) / (CHUNKS + 2)
    print(f"metering, best of 5 x {ROUNDS}: non-streamed request +{per_request:.1f} us "
          f"({per_request / 1000:.3f} of the 1 ms added-latency budget); streamed chunk +{per_chunk:.2f} us "
          f"(a {CHUNKS}-token stream +{(metered_stream - bare_stream) * 1e6:.0f} us in all)")


if __name__ == "__main__":
    asyncio.run(main())
