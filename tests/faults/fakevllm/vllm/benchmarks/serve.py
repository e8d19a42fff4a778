"""A fake `vllm bench serve`: the flags mm and benchmarks/batch12.py pass, requests through the real
HTTP path (streamed, as vLLM's bench streams them), and a result JSON with vLLM's own keys, so a
sweep or a bench runs end to end against the fake server (`--dry` runs, faults tests).

Prompts: the random dataset's are `--random-input-len` words; the custom dataset's are the "prompt"
of each line of --dataset-path (a .jsonl), ShareGPT's the first turn of each conversation. Output
lengths: --random-output-len / --custom-output-len / --sharegpt-output-len.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vllm bench serve (fake)")
    for name, kind, default in (("--base-url", str, None), ("--endpoint", str, "/v1/completions"),
                                ("--backend", str, "vllm"), ("--model", str, None), ("--tokenizer", str, None),
                                ("--dataset-name", str, "random"), ("--dataset-path", str, None),
                                ("--num-prompts", int, 1000), ("--max-concurrency", int, None),
                                ("--random-input-len", int, 1024), ("--random-output-len", int, 128),
                                ("--custom-output-len", int, 256), ("--sharegpt-output-len", int, 256), ("--request-rate", str, "inf"),
                                ("--num-warmups", int, 0), ("--seed", int, 0), ("--result-dir", str, "."),
                                ("--result-filename", str, "result.json"), ("--percentile-metrics", str, ""),
                                ("--metric-percentiles", str, "99")):
        ap.add_argument(name, type=kind, default=default)
    for name in ("--ignore-eos", "--save-result", "--save-detailed", "--disable-tqdm", "--skip-chat-template",
                 "--disable-shuffle"):
        ap.add_argument(name, action="store_true")
    return ap.parse_known_args(argv)[0]


def prompts(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(prompt, output tokens) for each request."""
    if args.dataset_name == "custom":
        lines = [json.loads(x) for x in Path(args.dataset_path).read_text().splitlines() if x.strip()]
        texts = [x["prompt"] for x in lines]
        texts = (texts * (args.num_prompts // max(1, len(texts)) + 1))[:args.num_prompts]
        return [(t, args.custom_output_len) for t in texts]
    if args.dataset_name == "sharegpt":
        texts = [c["conversations"][0]["value"] for c in json.loads(Path(args.dataset_path).read_text())]
        texts = (texts * (args.num_prompts // max(1, len(texts)) + 1))[:args.num_prompts]
        return [(t, args.sharegpt_output_len) for t in texts]
    return [(" ".join(["word"] * args.random_input_len), args.random_output_len)] * args.num_prompts


async def one(client, args, prompt: str, output_len: int) -> dict:
    chat = "chat" in args.endpoint
    body = {"model": args.model, "max_tokens": output_len, "stream": True, "ignore_eos": args.ignore_eos,
            "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
    headers = {"authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"} if os.environ.get("OPENAI_API_KEY") else {}
    t0 = time.perf_counter()
    out = {"ok": False, "ttft": None, "itl": [], "tokens": 0, "prompt_tokens": 0, "error": ""}
    last = t0
    try:
        async with client.stream("POST", args.base_url.rstrip("/") + args.endpoint, json=body, headers=headers) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                now = time.perf_counter()
                if doc.get("choices"):
                    if out["ttft"] is None:
                        out["ttft"] = now - t0
                    else:
                        out["itl"].append(now - last)
                    last = now
                if doc.get("usage"):
                    out["tokens"] = doc["usage"].get("completion_tokens", 0)
                    out["prompt_tokens"] = doc["usage"].get("prompt_tokens", 0)
    except Exception as e:  # noqa: BLE001 - vLLM's bench records a failed request and goes on too
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["ok"], out["e2el"] = out["ttft"] is not None, time.perf_counter() - t0
    return out


async def run(args: argparse.Namespace) -> dict:
    import httpx

    work = prompts(args)
    limit = args.max_concurrency or len(work) or 1
    gate = asyncio.Semaphore(limit)
    in_flight = {"now": 0, "max": 0}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=limit + 4)) as client:
        async def gated(prompt: str, n: int) -> dict:
            async with gate:
                in_flight["now"] += 1
                in_flight["max"] = max(in_flight["max"], in_flight["now"])
                try:
                    return await one(client, args, prompt, n)
                finally:
                    in_flight["now"] -= 1
        for prompt, n in work[:args.num_warmups]:
            await one(client, args, prompt, n)
        t0 = time.perf_counter()
        done = await asyncio.gather(*(gated(p, n) for p, n in work))
        duration = time.perf_counter() - t0
    return figures(done, duration, in_flight["max"])


def figures(done: list[dict], duration: float, max_in_flight: int) -> dict:
    ok = [d for d in done if d["ok"]]
    out_tokens = sum(d["tokens"] for d in ok)
    in_tokens = sum(d["prompt_tokens"] for d in ok)
    doc = {"backend": "fake", "completed": len(ok), "failed": len(done) - len(ok), "duration": duration,
           "request_throughput": len(ok) / duration if duration else 0.0,
           "output_throughput": out_tokens / duration if duration else 0.0,
           "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
           "max_output_tokens_per_s": out_tokens / duration if duration else 0.0,
           "max_concurrent_requests": max_in_flight, "total_input_tokens": in_tokens,
           "total_output_tokens": out_tokens, "errors": [d["error"] for d in done]}
    ms = {"ttft": [d["ttft"] * 1000 for d in ok],
          "tpot": [(d["e2el"] - d["ttft"]) * 1000 / (d["tokens"] - 1) for d in ok if d["tokens"] > 1],
          "itl": [x * 1000 for d in ok for x in d["itl"]], "e2el": [d["e2el"] * 1000 for d in ok]}
    for key, values in ms.items():
        if values:
            values.sort()
            doc[f"mean_{key}_ms"] = statistics.fmean(values)
            doc[f"median_{key}_ms"] = statistics.median(values)
            doc[f"p99_{key}_ms"] = values[min(len(values) - 1, int(0.99 * len(values)))]
    return doc


def main(argv: list[str]) -> None:
    args = parse(argv)
    doc = asyncio.run(run(args))
    print(f"fake vllm bench: {doc['completed']} done, {doc['failed']} failed, "
          f"{doc['output_throughput']:.1f} output tok/s", flush=True)
    if args.save_result:
        path = Path(args.result_dir) / args.result_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
