"""Mixed traffic over two models through mm, beside one model alone, measured in one run.

Two profiles, a big one (default: the kit's random-weight Qwen2.5-7B AWQ shapes) and a small one
(Qwen2.5-1.5B shapes), are served by one mm daemon. Loads, each for --duration seconds:

  single      32 clients in a loop, every request to the big model (the reference)
  50/50       the same clients, each request to either model at random
  90/10       90% big, 10% small
  chat4       4 users: a streamed 256-token answer from the big model (the reference for chat+title)
  chat+title  the same, each answer followed by a 10-token request to the small model (Open WebUI's
              title request)

Requests are non-streaming 64-token completions with ignore_eos (chat ones streamed); every answer's
`model` is checked against the model asked for. Then the switch itself: a request for the sleeping
model through mm, time to its first token, beside raw vLLM sleep + wake_up + first token on the same
servers (straight to their sockets), medians of --rounds; and a request for the small model sent
while the big one streams a long answer (`pause`): how long it waited, and whether the long answer,
paused for the switch, came back whole.

Each result line: `mix=NAME ratio=R p99_s=P errors=E wrong_model=W` where ratio is output tokens/s over
the reference's (single, or chat4 for chat+title) and p99 is of the rarer model's requests (all
requests for single). Before anything counts, --warmup seconds of load (a fresh server's first batches
compile and allocate); then --repeat passes over every mix, each line their median (the ratios of
each pass are listed). --card-gib N holds all but N GiB of the GPU first (ballast), as on that card.

Usage (GPU): python3 benchmarks/mixed_load.py --models-dir .gpu-stage/models --out FILE [--budget 12GiB]
Usage (here, fake vLLM, a smoke test): PYTHONPATH=tests/faults/fakevllm:. python3 benchmarks/mixed_load.py --fake
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import ROOT, finish, mm

GPU_PROFILE = """
model = "{path}"
served_model_name = "{name}"
startup_timeout = 900
[sleep]
enabled = true
level = 1
[engine]
load_format = "dummy"
dtype = "bfloat16"
enforce_eager = true
max_model_len = 2048
max_num_seqs = 32
max_num_batched_tokens = 2048
{extra}
"""
FAKE_PROFILE = """
model = "fake/{name}"
served_model_name = "{name}"
[sleep]
enabled = true
[env]
FAKE_TOKENS = "64"
FAKE_TOKEN_DELAY = "0.002"
"""



class Load:
    """Closed-loop clients; each picks its model per request with `pick`."""

    def __init__(self, base: str, names: dict[str, str]):
        self.base, self.names = base, names
        self.tokens = 0
        self.latency: dict[str, list[float]] = {k: [] for k in names}
        self.errors = self.wrong = 0

    async def one(self, client: httpx.AsyncClient, which: str, max_tokens: int, stream: bool) -> None:
        name = self.names[which]
        body = {"model": name, "max_tokens": max_tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Tell me about the number {random.randint(0, 10**6)}."}]}
        t0 = time.perf_counter()
        try:
            if stream:
                got, answered = 0, None
                async with client.stream("POST", f"{self.base}/v1/chat/completions",
                                         json={**body, "stream": True,
                                               "stream_options": {"include_usage": True}}) as r:
                    if r.status_code != 200:
                        self.errors += 1
                        return
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            answered = chunk.get("model", answered)
                            if chunk.get("usage"):
                                got = chunk["usage"]["completion_tokens"]
                self.wrong += answered != name
                self.tokens += got
            else:
                r = await client.post(f"{self.base}/v1/chat/completions", json=body)
                if r.status_code != 200:
                    self.errors += 1
                    return
                doc = r.json()
                self.wrong += doc.get("model") != name
                self.tokens += doc["usage"]["completion_tokens"]
        except httpx.HTTPError:
            self.errors += 1
            return
        self.latency[which].append(time.perf_counter() - t0)

    async def run(self, clients: int, duration: float, script) -> float:
        """Runs `script(client)` coroutines in a loop on `clients` connections; returns tokens/s."""
        end = time.perf_counter() + duration

        async def worker() -> None:
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=4)) as client:
                while time.perf_counter() < end:
                    await script(client)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return self.tokens / (time.perf_counter() - t0)


def p99(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


async def one_pass(base: str, names: dict[str, str], duration: float, clients: int) -> dict[str, dict]:
    """Each mix once: {mix: {"tok_s", "p99_s" (the rarer model's), "p99_big_s", "errors", "wrong"}}."""
    out: dict[str, dict] = {}

    async def mixed(share_small: float) -> tuple[Load, float]:
        load = Load(base, names)

        async def script(client):
            await load.one(client, "small" if random.random() < share_small else "big", 64, False)
        return load, await load.run(clients, duration, script)

    async def chat(with_title: bool) -> tuple[Load, float]:
        load = Load(base, names)

        async def script(client):
            await load.one(client, "big", 256, True)
            if with_title:
                await load.one(client, "small", 10, False)
        return load, await load.run(4, duration, script)

    def figures(load: Load, rate: float, rare: str) -> dict:
        return {"tok_s": rate, "p99_s": p99(load.latency[rare]), "p99_big_s": p99(load.latency["big"]),
                "errors": load.errors, "wrong": load.wrong}
    single, rate = await mixed(0.0)
    out["single"] = figures(single, rate, "big")
    for label, share in (("50/50", 0.5), ("90/10", 0.1)):
        out[label] = figures(*await mixed(share), "small")
    out["chat4"] = figures(*await chat(False), "big")
    out["chat+title"] = figures(*await chat(True), "small")
    return out


async def warm_up(base: str, names: dict[str, str], seconds: float, clients: int) -> None:
    """Both models answer and the big one serves the full load for a while before anything counts
    (the first batches of a fresh server compile and allocate: the single-model reference ran cold)."""
    load = Load(base, names)

    async def script(client):
        await load.one(client, "small" if random.random() < 0.1 else "big", 64, False)
    await load.run(clients, seconds, script)


async def mixes(base: str, names: dict[str, str], duration: float, clients: int, repeat: int = 1,
                warmup_s: float = 0.0) -> list[str]:
    """A line per mix: the median of `repeat` passes (each pass runs every mix once, so that a slow
    phase of the machine touches all mixes alike); ratios are of each pass's own reference."""
    if warmup_s > 0:
        await warm_up(base, names, warmup_s, clients)
    passes = [await one_pass(base, names, duration, clients) for _ in range(repeat)]

    def med(mix: str, key: str) -> float:
        return statistics.median(p[mix][key] for p in passes)

    def ratios(mix: str, ref: str) -> list[float]:
        return [p[mix]["tok_s"] / p[ref]["tok_s"] if p[ref]["tok_s"] else float("nan") for p in passes]

    def errors(*mixes_: str) -> tuple[int, int]:
        return (sum(p[m]["errors"] for p in passes for m in mixes_), sum(p[m]["wrong"] for p in passes for m in mixes_))

    note = f" (median of {repeat})" if repeat > 1 else ""
    e, w = errors("single")
    lines = [f"mix=single ratio=1.000 p99_s={med('single', 'p99_s'):.3f} errors={e} wrong_model={w} "
             f"tok_s={med('single', 'tok_s'):.0f}{note}"]
    for label in ("50/50", "90/10"):
        r = ratios(label, "single")
        e, w = errors(label)
        lines.append(f"mix={label} ratio={statistics.median(r):.3f} p99_s={med(label, 'p99_s'):.3f} errors={e} "
                     f"wrong_model={w} tok_s={med(label, 'tok_s'):.0f} p99_big_s={med(label, 'p99_big_s'):.3f}"
                     + (f" (median of {repeat}: ratios {' '.join(f'{x:.3f}' for x in r)})" if repeat > 1 else ""))
    r = ratios("chat+title", "chat4")
    e, w = errors("chat4", "chat+title")
    lines.append(f"mix=chat+title ratio={statistics.median(r):.3f} p99_s={med('chat+title', 'p99_s'):.3f} "
                 f"errors={e} wrong_model={w} tok_s={med('chat+title', 'tok_s'):.0f} "
                 f"chat4_tok_s={med('chat4', 'tok_s'):.0f}"
                 + (f" (median of {repeat}: ratios {' '.join(f'{x:.3f}' for x in r)})" if repeat > 1 else ""))
    return lines


def first_token_s(client: httpx.Client, url: str, model: str) -> float:
    body = {"model": model, "max_tokens": 16, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Say something."}]}
    t0 = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                return time.perf_counter() - t0
    return float("nan")


def direct(server: dict) -> httpx.Client:
    if server.get("uds"):
        return httpx.Client(transport=httpx.HTTPTransport(uds=server["uds"]), base_url="http://mm-upstream",
                            timeout=300)
    return httpx.Client(base_url=server["url"], timeout=300)


def switch_times(env: dict, base: str, names: dict[str, str], rounds: int) -> str:
    """Through mm: a request for the sleeping model, to its first token. Raw: sleep + wake_up + first
    token on the same servers, by hand."""
    proxy = httpx.Client(timeout=300)
    through = []
    for i in range(rounds):
        which = "small" if i % 2 == 0 else "big"
        through.append(first_token_s(proxy, base, names[which]))
    status = json.loads(mm(env, "status", "--json"))
    servers = {s["served_model_name"]: s for s in status["servers"]}
    clients = {k: direct(servers[n]) for k, n in names.items()}
    awake = next(k for k, n in names.items() if servers[n]["state"] == "awake")
    raw = []
    for i in range(rounds):
        other = "small" if awake == "big" else "big"
        t0 = time.perf_counter()
        clients[awake].post("/sleep", params={"level": 1}).raise_for_status()
        clients[other].post("/wake_up").raise_for_status()
        raw.append(time.perf_counter() - t0 + first_token_s(clients[other], "http://mm-upstream"
                                                            if servers[names[other]].get("uds") else
                                                            servers[names[other]]["url"], names[other]))
        awake = other
    # leave the servers as mm believes they are: mm's view is re-synced by a wake through it
    proxy.post(f"{base}/v1/chat/completions", json={"model": names[awake], "max_tokens": 1,
                                                    "messages": [{"role": "user", "content": "x"}]})
    mm_s, raw_s = statistics.median(through), statistics.median(raw)
    return (f"switch mm_s={mm_s:.3f} raw_s={raw_s:.3f} added_ms={(mm_s - raw_s) * 1000:.0f} "
            f"(medians of {rounds}; mm min {min(through):.3f} max {max(through):.3f}, raw min {min(raw):.3f} "
            f"max {max(raw):.3f})")


def pause_check(base: str, names: dict[str, str], tokens: int = 1536) -> str:
    """A long greedy answer from the big model alone, then the same answer with a request for the
    small model sent after its first tokens: how long that request waited, and whether the long
    answer came back whole (all its tokens; where mm paused it, vLLM recomputed it on waking) and
    with the same text as alone (random weights leave the top tokens close: a recompute in another
    batch shape may pick another one, so the agreeing prefix is given too)."""
    chat = f"{base}/v1/chat/completions"
    body = {"model": names["big"], "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "Count slowly."}]}

    def long_answer(started: threading.Event | None = None) -> tuple[str, int, float]:
        parts, got, t0 = [], 0, time.perf_counter()
        with httpx.Client(timeout=600) as client, client.stream("POST", chat, json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    parts += [c["delta"].get("content") or "" for c in chunk.get("choices") or []]
                    got = (chunk.get("usage") or {}).get("completion_tokens", got)
                    if started is not None and len(parts) >= 8:
                        started.set()
        return "".join(parts), got, time.perf_counter() - t0

    alone, alone_tokens, alone_s = long_answer()
    started, result = threading.Event(), {}
    reader = threading.Thread(target=lambda: result.update(answer=long_answer(started)))
    reader.start()
    started.wait(300)
    t0 = time.perf_counter()
    small = httpx.post(chat, timeout=600, json={"model": names["small"], "max_tokens": 16, "ignore_eos": True,
                                                "messages": [{"role": "user", "content": "Say something."}]})
    small_s = time.perf_counter() - t0
    reader.join(600)
    text, got, paused_s = result.get("answer", ("", 0, float("nan")))
    agree = next((i for i, (a, b) in enumerate(zip(text, alone)) if a != b), min(len(text), len(alone)))
    return (f"pause long_tokens={got}/{tokens} small_status={small.status_code} small_s={small_s:.2f} "
            f"long_alone_s={alone_s:.2f} long_with_switch_s={paused_s:.2f} same_text={'yes' if text == alone else 'no'} "
            f"(first {agree} of {len(alone)} characters agree; alone {alone_tokens} tokens)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", type=Path, default=ROOT / ".gpu-stage" / "models")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="passes over every mix; each line is their median")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before anything counts")
    ap.add_argument("--budget", help='config.toml gpu_budget for the daemon, e.g. "12GiB"')
    ap.add_argument("--big-extra", default="gpu_memory_utilization = 0.125", help="engine lines for the big model")
    ap.add_argument("--small-extra", default="gpu_memory_utilization = 0.125")
    ap.add_argument("--max-wait", type=float, help="config.toml switch_max_wait for the daemon (default: mm's)")
    ap.add_argument("--no-pause", action="store_true", help="config.toml switch_pause_in_flight = false")
    ap.add_argument("--label", default="", help="a word to tell variants apart in the output")
    ap.add_argument("--switch", action="store_true", help="also time the switch (needs one-at-a-time)")
    ap.add_argument("--fake", action="store_true", help="the fake vLLM (a smoke test without a GPU)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mm-mixed-"))
    (home / "config" / "profiles").mkdir(parents=True)
    names = {"big": "mix-big", "small": "mix-small"}
    for which, folder, extra in (("big", "dummy-7b-awq", args.big_extra), ("small", "dummy-1.5b", args.small_extra)):
        text = FAKE_PROFILE.format(name=names[which]) if args.fake else \
            GPU_PROFILE.format(path=args.models_dir.resolve() / folder, name=names[which], extra=extra)
        (home / "config" / "profiles" / f"{names[which]}.toml").write_text(text)
    config = (f'gpu_budget = "{args.budget}"\n' if args.budget else "") + \
        (f"switch_max_wait = {args.max_wait}\n" if args.max_wait is not None else "") + \
        ("switch_pause_in_flight = false\n" if args.no_pause else "")
    (home / "config" / "config.toml").write_text(config)
    port = 8200 + random.randint(0, 500)
    env = {**os.environ, "MM_HOME": str(home), "MM_PROXY_PORT": str(port),
           "MM_RUNTIME_DIR": tempfile.mkdtemp(prefix="mm-", dir="/tmp"),
           **({"HF_HUB_OFFLINE": "1"} if args.fake else {})}  # (fake/NAME is on no hub: `up --force` skips the look)
    base = f"http://127.0.0.1:{port}"
    out = [f"# benchmarks/mixed_load.py {args.label}".rstrip(), f"# {time.strftime('%Y-%m-%d %H:%M')}",
           f"# config.toml: {config.strip().replace(chr(10), ', ') or '(mm defaults)'}"]
    try:
        t0 = time.perf_counter()
        mm(env, "up", names["small"], "--force")
        mm(env, "up", names["big"], "--force")
        out.append(f"# started both in {time.perf_counter() - t0:.0f} s")
        out.append(f"# {args.warmup:.0f} s of warm-up load, then {args.repeat} passes of {args.duration:.0f} s per mix")
        out += asyncio.run(mixes(base, names, args.duration, args.clients, args.repeat, args.warmup))
        if args.switch:
            out.append(switch_times(env, base, names, args.rounds))
            out.append(pause_check(base, names))
        status = json.loads(mm(env, "status", "--json"))
        out.append(f"# switches in the last minute: {status.get('switches_per_min')}; states: "
                   + ", ".join(f"{s['profile']}={s['state']}" for s in status["servers"]))
        out.append(f"# card: {status.get('card')}")
    finally:
        finish(out, args.out, env)


if __name__ == "__main__":
    main()
