"""Send a run's requests to mm's endpoint, `concurrency` at a time, and append each answer to OUTPUT.

Built to keep up with the server, as vLLM's own `vllm bench serve` does: aiohttp (its C parser), one
pooled connection per worker, non-streaming requests, a fixed set of worker tasks pulling from a
short queue that a producer fills from the input as it goes (no task per prompt, no input held in
memory), request bodies encoded by the producer before a worker needs them, and the progress line
and the fsync (at most once a second, in a thread) on a ticker of their own.

A request that fails for the transport (refused, reset, timed out) or with a 5xx or 429 is retried
up to `retries` times with a growing, jittered pause (at least the Retry-After the answer gives);
any other 4xx is final at once (the same request fails the same way). A request that fails for good
is listed in OUTPUT.errors.jsonl and not written; the next run sends it again. When the last
requests all failed (the endpoint is gone, or every prompt is refused) the run stops instead of
going through the rest of the input."""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import aiohttp

from mmlib.batch.progress import Stats
from mmlib.batch.requests import CHAT_PATH, Job, answer_lines, refuses_n_for_greedy, split
from mmlib.batch.store import ErrorLog, OutputStore
from mmlib.errors import MMError

REQUEST_TIMEOUT_S = 3600.0  # the longest one (non-streamed) answer may take
CONNECT_TIMEOUT_S = 10.0


class Aborted(MMError):
    """The run stopped early: the last requests all failed."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3
    base_s: float = 0.5  # the first pause; each next one doubles
    cap_s: float = 30.0
    retry_after_cap_s: float = 60.0

    @staticmethod
    def retryable(status: int | None) -> bool:
        """None: a transport error (no answer)."""
        return status is None or status >= 500 or status in (408, 429)

    def delay(self, attempt: int, retry_after: str | None = None,
              rand: Callable[[], float] = random.random) -> float:
        """The pause before retry number attempt+1: base * 2**attempt, jittered to 50-100% of it, and
        at least the server's Retry-After (in seconds, capped)."""
        d = min(self.cap_s, self.base_s * 2 ** attempt)
        d = d / 2 + rand() * d / 2
        if retry_after:
            with contextlib.suppress(ValueError):
                d = max(d, min(float(retry_after), self.retry_after_cap_s))
        return d


@dataclass
class Outcome:
    doc: dict[str, Any] | None = None  # the answer, when it came
    error: str = ""
    status: int | None = None
    attempts: int = 0
    split: bool = False  # the server takes no n here (greedy): send the samples one by one


def error_text(status: int, raw: bytes) -> str:
    """`HTTP 400: <the server's message>`."""
    message = raw[:300].decode(errors="replace").strip()
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        doc = json.loads(raw)
        err = doc.get("error", doc)
        message = str(err.get("message") if isinstance(err, dict) else err)[:300]
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"


class Runner:
    def __init__(self, url: str, api_key: str | None, concurrency: int, store: OutputStore, errors: ErrorLog,
                 stats: Stats, policy: RetryPolicy = RetryPolicy(), progress: Any = None, tick_s: float = 0.25,
                 sync_s: float = 1.0, give_up_after: int | None = None):
        self.url = url.rstrip("/") + CHAT_PATH
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.concurrency, self.store, self.errors, self.stats = concurrency, store, errors, stats
        self.policy, self.progress, self.tick_s, self.sync_s = policy, progress, tick_s, sync_s
        self.give_up_after = give_up_after or max(16, concurrency)
        self.failing = 0  # requests failed for good in a row
        self.greedy_split = False
        self.session: aiohttp.ClientSession | None = None

    async def run(self, jobs: Iterator[Job]) -> Stats:
        """Send every job; returns the counts. Ctrl-C or SIGTERM ends it early (stats.interrupted), as
        does a run of failures (stats.aborted): what finished is in OUTPUT either way."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        on_term = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, me.cancel)  # type: ignore[union-attr]
            on_term = True
        queue: asyncio.Queue[Job | None] = asyncio.Queue(maxsize=2 * self.concurrency)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=REQUEST_TIMEOUT_S))
        tasks: list[asyncio.Task] = []
        self.stats.started = time.monotonic()
        if self.progress:
            self.progress.start()
        try:
            producer = asyncio.create_task(self._produce(jobs, queue))
            workers = [asyncio.create_task(self._work(queue)) for _ in range(self.concurrency)]
            tasks = [producer, *workers, asyncio.create_task(self._tick())]
            await asyncio.gather(producer, *workers)
        except asyncio.CancelledError:
            self.stats.interrupted = True
        except Aborted as e:
            self.stats.aborted = str(e)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.session.close()
            self.stats.ended = time.monotonic()
            if self.progress:
                self.progress.stop()
            if on_term:
                loop.remove_signal_handler(signal.SIGTERM)
        return self.stats

    async def _produce(self, jobs: Iterator[Job], queue: asyncio.Queue) -> None:
        for job in jobs:
            await queue.put(job)
        for _ in range(self.concurrency):
            await queue.put(None)

    async def _work(self, queue: asyncio.Queue) -> None:
        while (job := await queue.get()) is not None:
            await self._do(job)

    async def _tick(self) -> None:
        last_sync = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            if self.progress:
                self.progress.update()
            if self.store.dirty and time.monotonic() - last_sync >= self.sync_s:
                last_sync = time.monotonic()
                await asyncio.to_thread(self.store.sync)

    async def _do(self, job: Job) -> None:
        if self.greedy_split and job.n > 1:
            await asyncio.gather(*(self._do(j) for j in split(job)))
            return
        out = await self._send(job)
        if out.split:
            self.greedy_split = True
            await self._do(job)
            return
        if out.doc is None:
            self._failed(job, job.samples, out.error, out.status, out.attempts)
            return
        answer = answer_lines(job, out.doc)
        if answer.lines:
            self.store.append(answer.lines)
        s = self.stats
        s.written += answer.samples
        s.output_tokens += answer.output_tokens
        s.requests += 1
        if answer.missing:
            self._failed(job, answer.missing, f"the answer held {answer.samples} of {job.n} samples", 200,
                         out.attempts)
        else:
            self.failing = 0

    def _failed(self, job: Job, samples: list[int], why: str, status: int | None, attempts: int) -> None:
        self.errors.add(job.id, samples, why, status, attempts)
        self.stats.failed_requests += 1
        self.stats.failed_samples += len(samples)
        self.failing += 1
        if self.failing >= self.give_up_after:
            raise Aborted(f"stopped: the last {self.failing} requests all failed (the last: {why})")

    async def _send(self, job: Job) -> Outcome:
        """POST the job, retrying what may pass next time."""
        assert self.session is not None
        out = Outcome()
        for attempt in range(self.policy.retries + 1):
            out.attempts = attempt + 1
            retry_after = None
            try:
                async with self.session.post(self.url, data=job.payload, headers=self.headers) as r:
                    raw = await r.read()
                    out.status = r.status
                    retry_after = r.headers.get("Retry-After")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                out.status, out.error = None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if out.status == 200:
                    try:
                        out.doc = json.loads(raw)
                        return out
                    except ValueError:
                        out.error = "the answer was not JSON"
                        out.status = None  # as a transport fault: worth another try
                else:
                    out.error = error_text(out.status, raw)
                    if job.n > 1 and refuses_n_for_greedy(out.status, out.error):
                        out.split = True
                        return out
            if not self.policy.retryable(out.status) or attempt == self.policy.retries:
                return out
            self.stats.retries += 1
            await asyncio.sleep(self.policy.delay(attempt, retry_after))
        return out
