"""`mm batch` against vLLM's own `vllm bench serve`: the same prompts, the same server, the same
endpoint (mm's), the same concurrency, in one run; the ratio of their output throughput printed.

Issue 23 asks `mm batch` over 1,000 prompts to reach at least 0.95 of the best `vllm bench serve`
throughput. Both send chat requests to mm's endpoint with the same messages, output length and
ignore_eos (so each answer is exactly --output-len tokens); vLLM's bench streams (its
openai-chat backend), mm batch does not. The concurrency is the one `mm batch` picks for the profile
(mm.measure.sweep.best_concurrency, printed by its first run), unless --concurrency says. Rounds go
batch, bench, bench, batch, ... (ABBA, so drift on the machine favours neither); the best of each
is compared.

    python3 benchmarks/batch_throughput.py [--profile default] [--prompts 1000] [--output-len 128]
        [--rounds 2] [--concurrency C] [--out benchmark_results/runs/batch_throughput.txt]

It uses the MM_HOME of its environment (a scratch one with --scratch: the embedded default profile
only), starts the profile through mm, and leaves it running unless --scratch.
On this repository's 2-core CPU (the embedded model, small settings to keep it short):
    .venv/bin/python benchmarks/batch_throughput.py --scratch --prompts 200 --output-len 16
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import finish, mm  # noqa: E402

WORDS = ("river stone light garden market winter engine paper window story music number silver city "
         "forest morning road letter island bridge ocean mountain lamp clock field harbour station").split()


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """Varied prompts, 20-200 words: the same list for both clients."""
    rng = random.Random(seed)
    return [f"Prompt {i}: continue this text. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
            for i in range(n)]


def device() -> str:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        name = []
    return name[0] if name else f"CPU ({os.cpu_count()} cores)"


def run_batch(env: dict, profile: str, prompts_file: Path, work: Path, output_len: int,
              concurrency: int | None, force: bool = False) -> dict:
    out = work / f"batch-{time.monotonic_ns()}.jsonl"
    argv = [sys.executable, "-m", "mmlib", "batch", profile, str(prompts_file), "-o", str(out), "--ignore-eos",
            "--max-tokens", str(output_len)] + (["--concurrency", str(concurrency)] if concurrency else []) + \
        (["--force"] if force else [])
    r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"mm batch failed:\n{r.stderr}")
    summary = [line for line in r.stderr.splitlines() if line.startswith("wrote ")][-1]
    wall = re.search(r"; ([\d.]+) s wall|; (\d+):(\d\d) wall", summary)
    seconds = float(wall.group(1)) if wall.group(1) else int(wall.group(2)) * 60 + int(wall.group(3))
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    tokens = sum(d["usage"]["completion_tokens"] for d in docs)
    chosen = re.search(r"concurrency (\d+): (.*)", r.stderr)
    out.unlink()
    return {"tok_s": tokens / seconds, "seconds": seconds, "completed": len(docs), "tokens": tokens,
            "concurrency": int(chosen.group(1)), "source": chosen.group(2)}


def run_bench(env: dict, server: dict, tokenizer: str, dataset: Path, work: Path, prompts: int, output_len: int,
              concurrency: int) -> dict:
    name = f"bench-{time.monotonic_ns()}.json"
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai-chat",
            "--endpoint", "/v1/chat/completions", "--base-url", server["endpoint"],
            "--model", server["served_model_name"], "--tokenizer", tokenizer,
            "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
            "--custom-output-len", str(output_len), "--ignore-eos", "--num-prompts", str(prompts),
            "--request-rate", "inf", "--max-concurrency", str(concurrency), "--disable-tqdm",
            "--save-result", "--result-dir", str(work), "--result-filename", name]
    bench_env = {**env, **({"OPENAI_API_KEY": server["api_key"]} if server.get("api_key") else {})}
    r = subprocess.run(argv, env=bench_env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode or not (work / name).exists():
        raise SystemExit(f"vllm bench serve failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    doc = json.loads((work / name).read_text())
    return {"tok_s": doc["output_throughput"], "seconds": doc["duration"], "completed": doc["completed"],
            "tokens": doc["total_output_tokens"]}


def served(env: dict, profile: str) -> dict:
    """The profile's server as `mm status --json` shows it, with mm's endpoint and key."""
    doc = json.loads(mm(env, "status", "--json"))
    [server] = [s for s in doc["servers"] if s["profile"] == profile]
    return {**server, "endpoint": doc["daemon"]["proxy"], "api_key": env.get("MM_API_KEY")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, help="default: what mm batch picks for the profile")
    ap.add_argument("--scratch", action="store_true", help="a scratch MM_HOME, stopped at the end")
    ap.add_argument("--force", action="store_true", help="skip mm's start checks (a dummy-weight model folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmark_results" / "runs" / "batch_throughput.txt")
    args = ap.parse_args()

    from mmlib.measure.helper import tokenizer_path
    from mmlib.profiles.profile import load_profile

    work = Path(tempfile.mkdtemp(prefix="mm-batch-bench-"))
    env = dict(os.environ)
    if args.scratch:
        from tests.conftest import free_port

        env.update(MM_HOME=str(work / "home"), MM_PROXY_PORT=str(free_port()), MM_RESULTS_DIR=str(work / "results"))
    texts = make_prompts(args.prompts)
    batch_input, dataset = work / "prompts.jsonl", work / "dataset.jsonl"
    batch_input.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    dataset.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))

    mm(env, "up", args.profile, *(["--force"] if args.force else []))
    server = served(env, args.profile)
    os.environ.update({k: v for k, v in env.items() if k.startswith("MM_")})  # load_profile reads MM_HOME
    tokenizer = tokenizer_path(server.get("model") or load_profile(args.profile).model)
    concurrency = args.concurrency
    results: dict[str, list[dict]] = {"mm batch": [], "vllm bench serve": []}
    lines = [f"# mm batch vs vllm bench serve: {time.strftime('%Y-%m-%d %H:%M')}, {device()}, profile "
             f"{args.profile} ({server['served_model_name']}), {args.prompts} prompts x {args.output_len} output "
             f"tokens (ignore_eos), through mm's endpoint"]
    for r in range(args.rounds):
        order = ["mm batch", "vllm bench serve"] if r % 2 == 0 else ["vllm bench serve", "mm batch"]
        for who in order:
            if who == "mm batch":
                res = run_batch(env, args.profile, batch_input, work, args.output_len, concurrency, args.force)
                if concurrency is None:
                    concurrency = res["concurrency"]
                    lines.append(f"concurrency {concurrency}: {res['source']}")
            else:
                if concurrency is None:
                    raise SystemExit("no concurrency yet")
                res = run_bench(env, server, tokenizer, dataset, work, args.prompts, args.output_len, concurrency)
            results[who].append(res)
            line = (f"round {r + 1} {who:>16}: {res['tok_s']:10,.1f} output tok/s  {res['seconds']:7.2f} s  "
                    f"{res['completed']} answers, {res['tokens']:,} tokens")
            print(line, flush=True)
            lines.append(line)
    best = {who: max(x["tok_s"] for x in rs) for who, rs in results.items()}
    ratio = best["mm batch"] / best["vllm bench serve"]
    lines.append(f"best: mm batch {best['mm batch']:,.1f} / vllm bench serve {best['vllm bench serve']:,.1f} "
                 f"output tok/s = {ratio:.3f} (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    if args.scratch:
        finish(lines, args.out, env)
    else:
        finish_lines = "\n".join(lines) + "\n"
        print(finish_lines)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(finish_lines)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
