"""The request meter against scripted ASGI messages, the vLLM re-export, the event rings."""
from __future__ import annotations

import asyncio
import json

from prometheus_client.parser import text_string_to_metric_families

from mmlib.serve.events import EventLog
from mmlib.serve.metrics import Metrics, usage_of, vllm_families


def families(metrics: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def value(metrics: Metrics, sample: str, **labels) -> float:
    for f in text_string_to_metric_families(metrics.render().decode()):
        for s in f.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{sample} {labels}")


def run(meter, start: dict, bodies: list[bytes], end: bool = True) -> list[bytes]:
    """Send a response through the meter's wrapped send; return what reached the client."""
    seen = []

    async def send(message):
        if message["type"] == "http.response.body":
            seen.append(message["body"])

    async def go():
        wrapped = meter.wrap(send)
        await wrapped({"type": "http.response.start", **start})
        for b in bodies:
            await wrapped({"type": "http.response.body", "body": b, "more_body": True})
        if end:
            await wrapped({"type": "http.response.body", "body": b"", "more_body": False})
        meter.done()
    asyncio.run(go())
    return seen


SSE = {"status": 200, "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]}
JSON = {"status": 200, "headers": [(b"content-type", b"application/json")]}


def chunk(text: str) -> bytes:
    return f'data: {json.dumps({"choices": [{"delta": {"content": text}}]})}\n\n'.encode()


USAGE = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
DONE = b"data: [DONE]\n\n"


def stream_request(metrics, **extra):
    doc = {"model": "m", "stream": True, "messages": [], **extra}
    return metrics.request("m", "/v1/chat/completions", doc, json.dumps(doc).encode())


def test_a_stream_gets_usage_asked_for_and_the_client_never_sees_that_chunk():
    metrics = Metrics()
    meter = stream_request(metrics)
    sent = json.loads(meter.body)
    assert sent["stream_options"] == {"include_usage": True} and sent["messages"] == []
    out = b"".join(run(meter, SSE, [chunk("a"), chunk("b") + USAGE[:20], USAGE[20:] + DONE]))
    assert out == chunk("a") + chunk("b") + DONE  # the cut usage event was held, then dropped
    assert value(metrics, "mm_tokens_total", model="m", direction="in") == 7
    assert value(metrics, "mm_tokens_total", model="m", direction="out") == 3
    assert value(metrics, "mm_requests_total", model="m", code="200") == 1
    assert value(metrics, "mm_time_to_first_token_seconds_count", model="m") == 1


def test_a_client_that_asked_for_usage_keeps_it_and_is_counted():
    metrics = Metrics()
    doc_options = {"include_usage": True}
    meter = stream_request(metrics, stream_options=doc_options)
    assert not meter.strip_usage and json.loads(meter.body)["stream_options"] == doc_options
    parts = [chunk("a"), USAGE[:30], USAGE[30:], DONE]
    assert run(meter, SSE, parts) == parts + [b""]  # byte for byte what upstream sent
    assert value(metrics, "mm_tokens_total", model="m", direction="out") == 3


def test_a_client_that_said_no_usage_is_left_alone():
    metrics = Metrics()
    meter = stream_request(metrics, stream_options={"include_usage": False})
    assert b"include_usage\": false" in meter.body
    run(meter, SSE, [chunk("a"), DONE])
    assert not [s for s in families(metrics)["mm_tokens"].samples if s.name == "mm_tokens_total" and s.value]


def test_non_streamed_answers_count_usage_from_their_body():
    metrics = Metrics()
    doc = {"model": "m", "messages": []}
    meter = metrics.request("m", "/v1/chat/completions", doc, json.dumps(doc).encode())
    assert meter.body == json.dumps(doc).encode()  # untouched: not a stream
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5}}).encode()
    run(meter, JSON, [body[:9], body[9:]])
    assert value(metrics, "mm_tokens_total", model="m", direction="in") == 11
    assert value(metrics, "mm_tokens_total", model="m", direction="out") == 5


def test_errors_client_gone_and_error_events():
    metrics = Metrics()
    run(metrics.request("m", "/v1/chat/completions", None, b""), {"status": 400, "headers": []}, [b"{}"])
    meter = stream_request(metrics)
    run(meter, SSE, [chunk("a")], end=False)  # the client went away: the proxy returns early
    meter = stream_request(metrics)
    run(meter, SSE, [chunk("a"), b'\n\ndata: {"error": {"message": "upstream connection lost"}}\n\n'])
    assert value(metrics, "mm_requests_total", model="m", code="400") == 1
    assert value(metrics, "mm_requests_total", model="m", code="499") == 1
    assert value(metrics, "mm_requests_total", model="m", code="200") == 1
    assert value(metrics, "mm_request_errors_total", model="m") == 2  # the 400 and the broken stream
    kinds = [(e["code"], e["error"]) for e in metrics.events.after()]
    assert kinds == [(400, True), (499, False), (200, True)]


def test_queue_wait_and_waiting_gauge():
    metrics = Metrics()
    meter = stream_request(metrics)
    with meter.queued():
        assert metrics.waiting == {"m": 1}
    assert metrics.waiting == {}
    assert value(metrics, "mm_queue_wait_seconds_count", model="m") == 1


def test_switches_count_and_time():
    metrics = Metrics()
    metrics.switched([], ["a"], 0.5)
    metrics.switched(["a"], ["b"], 0.25)
    metrics.switched(["b"], ["a"], 0.125)
    assert value(metrics, "mm_switches_total", **{"from": "none", "to": "a"}) == 1
    assert value(metrics, "mm_switches_total", **{"from": "a", "to": "b"}) == 1
    assert value(metrics, "mm_switch_duration_seconds_count", to="a") == 2
    assert value(metrics, "mm_switch_duration_seconds_sum", to="a") == 0.625


VLLM_TEXT = """# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="qwen"} 42.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="qwen"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="qwen"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="qwen"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="qwen"} 0.9
"""


def test_vllm_metrics_are_merged_per_family_with_a_model_label():
    out = {f.name: f for f in vllm_families({"a": VLLM_TEXT, "b": VLLM_TEXT.replace("42.0", "7.0"), "c": None})}
    assert [s.value for s in out["mm_vllm_scrape_ok"].samples] == [1, 1, 0]
    tokens = out["vllm:generation_tokens"].samples
    assert [(s.labels["model"], s.value) for s in tokens] == [("a", 42.0), ("b", 7.0)]
    assert len(out["vllm:time_to_first_token_seconds"].samples) == 8
    text = "".join(_render(out.values()))
    assert text.count("# TYPE vllm:generation_tokens_total counter") == 1  # one family, both servers
    assert 'vllm:generation_tokens_total{engine="0",model="b",model_name="qwen"} 7.0' in text


def _render(fams):
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self):
            return fams

    r = CollectorRegistry()
    r.register(One())
    yield generate_latest(r).decode()


def test_garbage_from_a_server_counts_as_not_scraped():
    out = {f.name: f for f in vllm_families({"a": "this is { not prometheus"})}
    assert [s.value for s in out["mm_vllm_scrape_ok"].samples] == [0]


def test_usage_of_both_api_shapes():
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == (3, 4)
    assert usage_of({"response": {"usage": {"input_tokens": 5, "output_tokens": 6}}}) == (5, 6)
    assert usage_of({"usage": None}) is None and usage_of([]) is None


def test_event_rings_keep_changes_when_requests_flood():
    now = [1000.0]
    log = EventLog(clock=lambda: now[0], requests_kept=10, changes_kept=10)
    log.add("switch", to=["a"])
    for _ in range(50):
        log.add("request", model="a")
    kinds = [e["kind"] for e in log.after()]
    assert kinds.count("switch") == 1 and kinds.count("request") == 10
    assert [e["seq"] for e in log.after(45)] == [46, 47, 48, 49, 50, 51]
    now[0] += 3601
    log.add("state", model="a", state="asleep")
    assert [e["kind"] for e in log.after()] == ["state"]  # older than the hour: gone from view
