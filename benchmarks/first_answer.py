"""The embedded default's first answers under several generation settings (issue 22).

Starts the default profile through mm (its own MM_HOME), then for each setting asks "What is the
capital of France?" ten times (all at once, as fresh requests) and five everyday questions, and
writes each distinct first sentence with its count; then long answers with the share of their
4-word phrases that repeat (a loop is near 1). Each request spells every sampling parameter, so
the profile's own defaults do not leak in.

Usage: .venv/bin/python benchmarks/first_answer.py [--out benchmark_results/runs/first_answer.txt]
(MM_CACHE_DIR=~/.cache/mm-tests reuses the tests' converted model.)
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import httpx
from common import ROOT, finish, mm

FRANCE = "What is the capital of France?"
EVERYDAY = ["How many days are in a week?", "What color is the sky on a clear day?", "What is 2 + 2?",
            "How many legs does a spider have?", "What is the opposite of hot?"]
LONG = ["Write a very long story about a dragon.", "Tell me about Paris.", "Explain how a car engine works.",
        "List ten fruits."]
OFF = {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
SETTINGS = {
    "before (temperature 0.1, top_p 0.9, repetition_penalty 1.15)":
        {"temperature": 0.1, "top_p": 0.9, "repetition_penalty": 1.15},
    "temperature 0.1, top_p 0.9, no penalty": {"temperature": 0.1, "top_p": 0.9},
    "greedy, no penalty": {"temperature": 0.0},
    "greedy, presence_penalty 0.5": {"temperature": 0.0, "presence_penalty": 0.5},
    "greedy, frequency_penalty 0.5 (the profile's)": {"temperature": 0.0, "frequency_penalty": 0.5},
    "greedy, frequency_penalty 1.0": {"temperature": 0.0, "frequency_penalty": 1.0},
}


def first_sentence(text: str) -> str:
    match = re.search(r"[.!?](\s|$)", text.strip())
    return text.strip()[:match.end()].strip() if match else text.strip()


# Invented French, as in "L'Étoile de la Cité (The City of Love) - Paris."
FRENCH = re.compile(r"[À-ÿ]|\b(la|le|les|de|du|des|l')\b", re.IGNORECASE)


def repeated_share(text: str, n: int = 4) -> float:
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if len(grams) < 2 * n else 1 - len(set(grams)) / len(grams)


def asker(proxy: str, params: dict, max_tokens: int):
    def ask(question: str) -> str:
        r = httpx.post(f"{proxy}/v1/chat/completions", timeout=900, json={
            "model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            **OFF, **params})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    return ask


def one_setting(proxy: str, name: str, params: dict, pool: ThreadPoolExecutor) -> list[str]:
    short, long = asker(proxy, params, 80), asker(proxy, params, 400)
    firsts = [first_sentence(a) for a in pool.map(short, [FRANCE] * 10)]
    plain = sum("Paris" in f and not FRENCH.search(f) for f in firsts)
    out = [f"== {name}: the first sentence names Paris with no invented French in {plain}/10"]
    out += [f"   {firsts.count(f)}x {f!r}" for f in sorted(set(firsts), key=firsts.count, reverse=True)]
    out += [f"   {q} -> {first_sentence(a)!r}" for q, a in zip(EVERYDAY, pool.map(short, EVERYDAY))]
    out += [f"   repeated {repeated_share(a):.2f}, {len(a)} chars: {q}" for q, a in zip(LONG, pool.map(long, LONG))]
    print("\n".join(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmark_results" / "runs" / "first_answer.txt")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mm-first-"))
    port = 8738
    env = {**os.environ, "MM_HOME": str(home), "MM_PROXY_PORT": str(port),
           "MM_RUNTIME_DIR": tempfile.mkdtemp(prefix="mm-", dir="/tmp")}
    lines = [f"# benchmarks/first_answer.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPU cores, "
             f"the embedded SmolLM2-135M-Instruct on vLLM {version('vllm')}; no system prompt (the chat template's own)"]
    try:
        mm(env, "up", "default")
        with ThreadPoolExecutor(10) as pool:
            for name, params in SETTINGS.items():
                lines += one_setting(f"http://127.0.0.1:{port}", name, params, pool)
    finally:
        finish(lines, args.out, env)


if __name__ == "__main__":
    main()
