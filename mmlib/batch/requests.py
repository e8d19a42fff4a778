"""The requests one input line needs, and the output lines an answer makes.

The n samples of a prompt share one prefill: one request asks for all of that prompt's missing
samples at once (vLLM's parallel sampling, `n`), and its choices map to the sample indexes in order.
With a seed, vLLM gives choice j of a request seeded s the seed s + j, so sample k is always sampled
with seed + k: the samples still missing go in runs of consecutive indexes, each run seeded
seed + its first index, and a resumed run makes the same sample k as an uninterrupted one (on the
same server and model; vLLM's batching can still move a token now and then, as it does between any
two runs). Greedy sampling (temperature 0) takes no `n` in vLLM: each sample is then a request of
its own (they are the same text anyway, and prefix caching shares the prompt's prefill).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from mmlib.batch.inputs import Item, ItemId

CHAT_PATH = "/v1/chat/completions"
GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature under it is greedy sampling


@dataclass(frozen=True)
class Settings:
    """What every request of a run asks for; None: the profile's default (as for any client)."""
    samples: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    ignore_eos: bool = False
    default_temperature: float | None = None  # the profile's, where it sets one: greedy takes no n


@dataclass(slots=True)
class Job:
    """One request: these samples of this id."""
    id: ItemId
    samples: list[int]
    body: dict[str, Any]
    payload: bytes

    @property
    def n(self) -> int:
        return len(self.samples)


def missing(done_bits: int, n: int) -> list[int]:
    """Sample indexes 0..n-1 whose bit is not set."""
    return [k for k in range(n) if not done_bits >> k & 1]


def runs(indexes: list[int]) -> list[list[int]]:
    """Consecutive runs: [0, 1, 3, 5, 6] -> [[0, 1], [3], [5, 6]]."""
    out: list[list[int]] = []
    for k in indexes:
        if out and out[-1][-1] == k - 1:
            out[-1].append(k)
        else:
            out.append([k])
    return out


def is_greedy(temperature: float | None) -> bool:
    return temperature is not None and temperature < GREEDY_BELOW


def jobs_for(item: Item, samples: list[int], model: str, s: Settings) -> list[Job]:
    temperature = item.temperature if item.temperature is not None else s.temperature
    if is_greedy(temperature if temperature is not None else s.default_temperature):
        groups = [[k] for k in samples]
    elif s.seed is not None:
        groups = runs(samples)
    else:
        groups = [samples]
    jobs = []
    for group in groups:
        body: dict[str, Any] = {"model": model, "messages": item.messages}
        if len(group) > 1:
            body["n"] = len(group)
            body["return_token_ids"] = True  # each choice's length; usage adds them up
        max_tokens = item.max_tokens if item.max_tokens is not None else s.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if s.top_p is not None:
            body["top_p"] = s.top_p
        if s.seed is not None:
            body["seed"] = s.seed + group[0]
        if s.ignore_eos:
            body["ignore_eos"] = True
        jobs.append(make_job(item.id, group, body))
    return jobs


def make_job(item_id: ItemId, samples: list[int], body: dict[str, Any]) -> Job:
    return Job(item_id, samples, body, json.dumps(body, ensure_ascii=False).encode())


def split(job: Job) -> list[Job]:
    """One request per sample (a server that refused n for greedy sampling)."""
    seed = job.body.get("seed")
    out = []
    for j, k in enumerate(job.samples):
        body = {key: v for key, v in job.body.items() if key not in ("n", "return_token_ids")}
        if seed is not None:
            body["seed"] = seed + j
        out.append(make_job(job.id, [k], body))
    return out


def plan(items: Iterable[Item], done: dict[ItemId, int], model: str, s: Settings) -> Iterator[Job]:
    """Every request still needed, in input order."""
    for item in items:
        samples = missing(done.get(item.id, 0), s.samples)
        if samples:
            yield from jobs_for(item, samples, model, s)


def refuses_n_for_greedy(status: int, text: str) -> bool:
    """vLLM's 400 for n > 1 with temperature 0 ("n must be 1 when using greedy sampling")."""
    return status == 400 and "greedy" in text


@dataclass
class Answer:
    lines: bytes  # the output lines, ready to append
    samples: int
    output_tokens: int
    missing: list[int]  # samples the answer lacked


def answer_lines(job: Job, doc: dict[str, Any]) -> Answer:
    """The output lines of a finished request: one per choice, by its index."""
    usage = doc.get("usage") or {}
    prompt_tokens = usage.get("prompt_tokens")
    model = doc.get("model")
    lines, got = [], set()
    for choice in doc.get("choices") or []:
        j = choice.get("index", 0)
        if not isinstance(j, int) or not 0 <= j < job.n or j in got:
            continue
        got.add(j)
        token_ids = choice.get("token_ids")
        tokens = len(token_ids) if isinstance(token_ids, list) else \
            usage.get("completion_tokens") if job.n == 1 else None
        text = (choice.get("message") or {}).get("content")
        lines.append(json.dumps({
            "id": job.id, "sample": job.samples[j], "text": text if text is not None else "",
            "finish_reason": choice.get("finish_reason"),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens}, "model": model,
        }, ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode() if lines else b""
    output_tokens = usage.get("completion_tokens")
    return Answer(data, len(lines), output_tokens if isinstance(output_tokens, int) else 0,
                  [k for j, k in enumerate(job.samples) if j not in got])
