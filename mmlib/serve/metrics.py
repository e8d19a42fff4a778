"""What mm measures, in Prometheus form (prometheus_client, on a registry of its own).

Per model (a profile's name): requests by HTTP code, errors, tokens in and out, time to first token,
queue wait and duration; switches and how long they took; at scrape time each server's state,
memory, in-flight and waiting requests, and each server's own vLLM /metrics re-exported with a
`model` label, so that one scrape of mm covers everything.

The proxy meters a request through a RequestMeter, which reads the answer from the ASGI messages
the proxy sends (status, first byte, body) instead of hooking into the relay itself. Token counts
come from the `usage` vLLM puts in its answers: non-streaming answers always carry it; a stream
carries it in a last chunk when asked, so mm asks (`stream_options.include_usage`) where the client
did not say, and takes that chunk out again before it reaches a client that did not ask for it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import defaultdict
from typing import Any, Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from mmlib.serve.events import EventLog
from mmlib.serve.states import State

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Waits include switches and cold starts, hence the long tail.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
SWITCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200)
# Where vLLM understands stream_options (the OpenAI chat and completions APIs).
USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
VLLM_SCRAPE_TIMEOUT_S = 1.0
JSON_BODY_LIMIT = 4 << 20  # non-streamed answers larger than this are not parsed for their usage
TAIL_LIMIT = 64 << 10  # the longest cut event kept for reading (a usage chunk is ~300 bytes)
CLIENT_GONE = 499  # nginx's code for "the client closed the connection first"
SCRAPED_STATES = (State.AWAKE.value, State.ASLEEP.value)  # a sleeping vLLM still answers /metrics

StatusFn = Callable[[], Awaitable[dict[str, Any]]]


class Metrics:
    """mm's measurements. `status` is the daemon's status (the one code path that reads servers and
    their memory); /metrics calls it at scrape time."""

    def __init__(self, status: StatusFn | None = None, events: EventLog | None = None):
        self.status = status
        self.events = events or EventLog()
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mm_requests", "Requests answered through the proxy, by HTTP code "
                                "(499: the client went away first)", ["model", "code"], registry=r)
        self.errors = Counter("mm_request_errors", "Requests answered with an error (HTTP 4xx/5xx, "
                              "an error event in a stream, or the upstream lost)", ["model"], registry=r)
        self.tokens = Counter("mm_tokens", "Tokens by direction (in: prompt, out: generated), from "
                              "the usage vLLM reports", ["model", "direction"], registry=r)
        self.ttft = Histogram("mm_time_to_first_token_seconds", "From the request reaching mm to the "
                              "first byte of a successful answer (streams: the first token), waits "
                              "and switches included", ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.queue_wait = Histogram("mm_queue_wait_seconds", "Time a request waited for its server "
                                    "to be ready (switches, starts)", ["model"], buckets=WAIT_BUCKETS,
                                    registry=r)
        self.duration = Histogram("mm_request_duration_seconds", "From the request reaching mm to "
                                  "the end of its answer", ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.switches = Counter("mm_switches", "Switches: the servers awake before ('none' if none "
                                "was) and the ones made to answer", ["from", "to"], registry=r)
        self.switch_seconds = Histogram("mm_switch_duration_seconds", "How long a switch took, "
                                        "sleeping others and waking or starting the target",
                                        ["to"], buckets=SWITCH_BUCKETS, registry=r)
        self.waiting: dict[str, int] = defaultdict(int)  # model -> requests inside scheduler.acquire
        self._live = _ScrapeTime()
        r.register(self._live)
        self._states: dict[str, str] = {}
        self._models: dict[str, _ModelSeries] = {}

    def of(self, model: str) -> "_ModelSeries":
        """One model's series, looked up once: labels() costs more than the observation itself."""
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = _ModelSeries(self, model)
        return series

    # --- hooks ------------------------------------------------------------------------------------
    def request(self, model: str, path: str, doc: dict | None, body: bytes) -> "RequestMeter":
        return RequestMeter(self, model, path, doc, body)

    def switched(self, before: list[str], after: list[str], seconds: float) -> None:
        """The scheduler finished a switch (one call at the end of Scheduler._switch_to)."""
        self.switches.labels("+".join(before) or "none", "+".join(after)).inc()
        self.switch_seconds.labels("+".join(after)).observe(seconds)
        self.events.add("switch", **{"from": list(before), "to": list(after), "seconds": round(seconds, 4)})

    def state_changed(self, server: Any) -> None:
        """A server changed state (ManagedServer.on_change)."""
        state = server.state.value
        was = self._states.get(server.name, State.STOPPED.value)
        self._states[server.name] = state
        if was != state:
            self.events.add("state", model=server.name, state=state, was=was)

    # --- scrape -----------------------------------------------------------------------------------
    async def scrape(self) -> bytes:
        """The whole exposition: mm's own metrics, the servers now, and each server's vLLM metrics."""
        doc = await self.status() if self.status else {}
        servers = doc.get("servers", [])
        targets = [s for s in servers if s.get("url") and s.get("state") in SCRAPED_STATES]
        texts = await fetch_all([(s.get("uds"), f"{s['url']}/metrics") for s in targets])
        self._live.servers, self._live.waiting = servers, dict(self.waiting)
        self._live.cards = doc.get("cards", [])
        self._live.vllm = {s["profile"]: text for s, text in zip(targets, texts)}
        return generate_latest(self.registry)  # no await between filling _live and reading it

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def fetch_all(where: list[tuple[str | None, str]], timeout_s: float = VLLM_SCRAPE_TIMEOUT_S) -> list[str | None]:
    """Each (unix socket or None, URL)'s text, fetched concurrently; None for one that failed or took
    longer than timeout_s. A server on a unix socket is reached through it (its URL reads unix:...)."""
    if not where:
        return []
    import aiohttp

    async def one(uds: str | None, url: str) -> str | None:
        connector = aiohttp.UnixConnector(path=uds) if uds else None
        if uds:
            url = "http://mm-upstream/metrics"
        try:
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
                async with session.get(url) as r:
                    return await r.text() if r.status == 200 else None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return None
    return list(await asyncio.gather(*(one(u, url) for u, url in where)))


class _ScrapeTime:
    """The metrics read at scrape time: filled by Metrics.scrape just before it renders."""

    def __init__(self) -> None:
        self.servers: list[dict[str, Any]] = []
        self.waiting: dict[str, int] = {}
        self.vllm: dict[str, str | None] = {}
        self.cards: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        yield from server_families(self.servers, self.waiting)
        yield from card_families(self.cards)
        yield from vllm_families(self.vllm)


def server_families(servers: list[dict[str, Any]], waiting: dict[str, int]) -> Iterator[Metric]:
    state = StateSetMetricFamily("mm_server_state", "Each server's state", labels=["model"])
    gpu = GaugeMetricFamily("mm_server_gpu_memory_bytes", "GPU memory a server's processes hold "
                            "(absent without a GPU or where NVML cannot tell)", labels=["model"])
    ram = GaugeMetricFamily("mm_server_ram_bytes", "RAM of a server's process tree (its PSS share: "
                            "libraries shared between processes counted once)", labels=["model"])
    in_flight = GaugeMetricFamily("mm_requests_in_flight", "Requests being answered by a server",
                                  labels=["model"])
    queued = GaugeMetricFamily("mm_requests_waiting", "Requests waiting for their server to be ready",
                               labels=["model"])
    for s in servers:
        name, memory = s["profile"], s.get("memory") or {}
        state.add_metric([name], {st.value: st.value == s["state"] for st in State})
        if memory.get("gpu_mib") is not None:
            gpu.add_metric([name], memory["gpu_mib"] * (1 << 20))
        ram_mib = memory["ram_mib"] if memory.get("ram_mib") is not None else memory.get("rss_mib")
        if ram_mib is not None:
            ram.add_metric([name], ram_mib * (1 << 20))
        in_flight.add_metric([name], s.get("in_flight", 0))
    for name, n in sorted(waiting.items()):
        queued.add_metric([name], n)
    yield from (state, gpu, ram, in_flight, queued)


def card_families(cards: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each card's memory, labelled by its index (NVML's, as `mm status` prints it), and what each
    server holds on it."""
    total = GaugeMetricFamily("mm_gpu_memory_total_bytes", "A card's memory", labels=["gpu"])
    used = GaugeMetricFamily("mm_gpu_memory_used_bytes", "A card's memory in use (every program's)", labels=["gpu"])
    capacity = GaugeMetricFamily("mm_gpu_memory_capacity_bytes", "What mm may fill of a card (gpu_budget)",
                                 labels=["gpu"])
    held = GaugeMetricFamily("mm_server_gpu_card_memory_bytes", "GPU memory a server's processes hold on a card",
                             labels=["model", "gpu"])
    for c in cards:
        gpu = str(c["index"])
        total.add_metric([gpu], c["total"])
        used.add_metric([gpu], c["used"])
        capacity.add_metric([gpu], c["capacity"])
        for s in c.get("servers") or []:
            if s.get("gpu_mib") is not None:
                held.add_metric([s["profile"], gpu], s["gpu_mib"] * (1 << 20))
    yield from (total, used, capacity, held)


def vllm_families(texts: dict[str, str | None]) -> Iterator[Metric]:
    """Every server's vLLM metrics, each sample labelled with its model; a family that several
    servers export becomes one family (a name may appear only once in an exposition)."""
    up = GaugeMetricFamily("mm_vllm_scrape_ok", "1 if the server's own /metrics answered in time",
                           labels=["model"])
    merged: dict[str, Metric] = {}
    for model, text in texts.items():
        up.add_metric([model], 0 if text is None else 1)
        if text is None:
            continue
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:  # not Prometheus text: count the server as not scraped
            up.samples[-1] = up.samples[-1]._replace(value=0)
            continue
        for family in families:
            out = merged.get(family.name)
            if out is None:
                out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                out.samples.append(sample._replace(labels=with_model(sample.labels, model)))
    yield up
    yield from merged.values()


def with_model(labels: dict[str, str], model: str) -> dict[str, str]:
    if "model" in labels:  # keep what the server said, as Prometheus does on a clash
        labels = {("exported_model" if k == "model" else k): v for k, v in labels.items()}
    return {**labels, "model": model}


# --- one request ---------------------------------------------------------------------------------
class RequestMeter:
    """Measures one request through the proxy. Use: body = meter.body; send = meter.wrap(send);
    `with meter.queued(): acquire`; meter.done() in a finally."""

    def __init__(self, metrics: Metrics, model: str, path: str, doc: dict | None, body: bytes):
        self.metrics, self.model = metrics, model
        self.t0 = time.perf_counter()
        self.body = body
        self.code: int | None = None
        self.wait_s: float | None = None
        self.first_byte_s: float | None = None
        self.usage: tuple[int, int] | None = None
        self.stream_error = False
        self.finished = False
        self._stream = False
        self._collected: list[bytes] | None = None
        self._collected_size = 0
        self._tail = b""  # an event not complete yet (streams)
        self.strip_usage = False
        if doc is not None and doc.get("stream") is True and "stream_options" not in doc and path in USAGE_PATHS:
            self._ask_for_usage(doc)

    def _ask_for_usage(self, doc: dict) -> None:
        """vLLM reports a stream's usage only when asked; ask, and take the answer out again."""
        doc["stream_options"] = {"include_usage": True}  # the proxy may re-serialize doc later
        head = self.body.lstrip()
        if head[:1] == b"{":  # splice rather than re-serialize: a long prompt costs nothing extra
            self.body = b'{"stream_options":{"include_usage":true},' + head[1:]
        else:
            self.body = json.dumps(doc).encode()
        self.strip_usage = True

    @contextlib.contextmanager
    def queued(self) -> Iterator[None]:
        waiting = self.metrics.waiting
        waiting[self.model] += 1
        t = time.perf_counter()
        try:
            yield
            self.wait_s = time.perf_counter() - t
            self.metrics.of(self.model).queue_wait.observe(self.wait_s)
        finally:
            waiting[self.model] -= 1
            if not waiting[self.model]:
                del waiting[self.model]

    def wrap(self, send: Callable[[dict], Awaitable[None]]) -> Callable[[dict], Awaitable[None]]:
        async def metered(message: dict) -> None:
            if message["type"] == "http.response.body":
                message = self._on_body(message)
            elif message["type"] == "http.response.start":
                self._on_start(message)
            await send(message)
        return metered

    def _on_start(self, message: dict) -> None:
        self.code = message["status"]
        content_type = next((v for k, v in message.get("headers", ()) if k.lower() == b"content-type"), b"")
        self._stream = content_type.startswith(b"text/event-stream")
        if not self._stream and content_type.startswith(b"application/json"):
            self._collected = []

    def _on_body(self, message: dict) -> dict:
        body, last = message.get("body", b""), not message.get("more_body", False)
        if body and self.first_byte_s is None:
            self.first_byte_s = time.perf_counter() - self.t0
        if self._stream:
            framed = self._stream_body(body, last)
            if framed is not body:
                message = {**message, "body": framed}
        elif self._collected is not None and body:
            self._collected_size += len(body)
            if self._collected_size <= JSON_BODY_LIMIT:
                self._collected.append(body)
        if last:
            self._finish()
        return message

    def _stream_body(self, body: bytes, last: bool) -> bytes:
        """Read usage and error events from a stream. An event the network cut in two is kept until
        its end arrives: read then, and, while usage is being stripped, held back from the client
        until then (a client cannot use half an event anyway)."""
        if not self._tail and body.endswith(b"\n\n") and b'"usage"' not in body and b'"error"' not in body:
            return body  # the common chunk: whole events, nothing to read
        data = self._tail + body if self._tail else body
        cut = len(data) if last or data.endswith(b"\n\n") else _end_of_events(data)
        complete, self._tail = data[:cut], data[cut:]
        if b'"usage"' in complete or b'"error"' in complete:
            complete = self._read_events(complete)
        if len(self._tail) > TAIL_LIMIT:  # not framed like vLLM's events: stop looking for them
            complete, self._tail = complete + self._tail, b""
        return complete if self.strip_usage else body

    def _read_events(self, complete: bytes) -> bytes:
        kept, dropped = [], False
        for event in complete.split(b"\n\n"):
            if b'"usage"' in event or b'"error"' in event:
                doc = _event_json(event)
                if isinstance(doc, dict):
                    self.stream_error |= "error" in doc
                    self.usage = usage_of(doc) or self.usage
                    if self.strip_usage and doc.get("choices") == [] and "usage" in doc:
                        dropped = True  # the chunk mm asked for: the client did not
                        continue
            kept.append(event)
        return b"\n\n".join(kept) if dropped else complete

    def _finish(self) -> None:
        if self._collected:
            try:
                self.usage = usage_of(json.loads(b"".join(self._collected))) or self.usage
            except ValueError:
                pass
        self._record(self.code or 500, error=bool(self.code and self.code >= 400) or self.stream_error)

    def done(self) -> None:
        """In the proxy's finally: a request that did not end with its last body message either lost
        its client (499) or its upstream (an exception is on its way out)."""
        if self.finished:
            return
        failed = sys.exc_info()[1] is not None
        self._record((self.code or 502) if failed else CLIENT_GONE, error=failed)

    def _record(self, code: int, error: bool) -> None:
        self.finished = True
        model = self.model
        series = self.metrics.of(model)
        seconds = time.perf_counter() - self.t0
        series.answered(code).inc()
        series.duration.observe(seconds)
        if error:
            series.errors.inc()
        elif self.first_byte_s is not None and code < 400:
            series.ttft.observe(self.first_byte_s)
        if self.usage:
            series.tokens_in.inc(self.usage[0])
            series.tokens_out.inc(self.usage[1])
        self.metrics.events.add("request", model=model, code=code, error=error, seconds=round(seconds, 4),
                     ttft=_round(self.first_byte_s), wait=_round(self.wait_s), stream=self._stream,
                     tokens_in=self.usage[0] if self.usage else None,
                     tokens_out=self.usage[1] if self.usage else None)


class _ModelSeries:
    def __init__(self, m: Metrics, model: str):
        self._requests, self.model, self._codes = m.requests, model, {}
        self.errors, self.duration = m.errors.labels(model), m.duration.labels(model)
        self.ttft, self.queue_wait = m.ttft.labels(model), m.queue_wait.labels(model)
        self.tokens_in, self.tokens_out = m.tokens.labels(model, "in"), m.tokens.labels(model, "out")

    def answered(self, code: int) -> Any:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._requests.labels(self.model, str(code))
        return child


def usage_of(doc: Any) -> tuple[int, int] | None:
    """(prompt, generated) tokens from an answer's usage: chat/completions (prompt_tokens,
    completion_tokens) or the responses API (input_tokens, output_tokens, under "response")."""
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if usage is None and isinstance(doc.get("response"), dict):
        usage = doc["response"].get("usage")
    if not isinstance(usage, dict):
        return None
    tokens_in = usage.get("prompt_tokens", usage.get("input_tokens"))
    tokens_out = usage.get("completion_tokens", usage.get("output_tokens"))
    if not isinstance(tokens_in, int) and not isinstance(tokens_out, int):
        return None
    return (tokens_in if isinstance(tokens_in, int) else 0, tokens_out if isinstance(tokens_out, int) else 0)


def _end_of_events(data: bytes) -> int:
    i = data.rfind(b"\n\n")
    return i + 2 if i >= 0 else 0


def _event_json(event: bytes) -> Any:
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    try:
        return json.loads(b"\n".join(lines)) if lines else None
    except ValueError:
        return None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
