"""Issue 23's run of record: batch work on an emulated 12 GiB card, through mm, with the chat profile
as card12.py serves it (the shipped profile, its model the weight-less 7B-AWQ fixture with random
weights of the real shapes; gpu_budget 12GiB).

1. `mm up chat`, then `mm bench chat --sweep` (levels 1..256): a line per level
       sweep c=C out_tok_s=X req_s=Y ttft_p50_ms=.. ttft_p99_ms=.. tpot_p50_ms=.. itl_p50_ms=.. failed=F
   then `knee=C best_c=B best_out_tok_s=X ttft_climbs_at=T` (the knee: the lowest concurrency reaching
   95% of the best output throughput), the plot copied to benchmark_results/batch_sweep_<device>.png.
2. The same --prompts prompts (1,000 of 200 tokens, seeded), written as an mm batch INPUT.jsonl
   ({"id", "prompt"}) and as vLLM's custom dataset ({"prompt"}), answered at the knee's concurrency
   with the same max_tokens, temperature and ignore_eos, each after the server was put to sleep and
   woken (sleep clears vLLM's prefix cache, so the second run gets no head start from the first):
   first `vllm bench serve --backend openai-chat --dataset-name custom` through mm's endpoint, then
   `mm batch chat INPUT -o OUT --concurrency C --ignore-eos --max-tokens N`:
       bench prompts=P concurrency=C out_tok_s=X seconds=S wall_s=W output_tokens=N failed=F
       batch prompts=P concurrency=C out_tok_s=X seconds=S wall_s=W output_tokens=N failed=F
       batch_vs_bench ratio=R batch_tok_s=A bench_tok_s=B concurrency=C prompts=P
   (issue 23's target: R >= 0.95). seconds: each client's own measure (vLLM's benchmark duration;
   mm batch's closing line), wall_s: its process, start-up included; out_tok_s = output tokens /
   seconds. vLLM's bench streams (its openai-chat backend only streams); mm batch does not.

The prompts as vLLM's bench takes them (both formats read by vLLM 0.32's own parser here): its custom
dataset, {"prompt": ...} lines with --custom-output-len N, which vLLM reads with pandas, and the flag
that keeps its client from applying the chat template to a prompt the chat endpoint templates again:
--skip-chat-template in 0.32 (vllm/benchmarks/datasets/datasets.py), --custom-skip-chat-template in
older releases (skip_template_flag() reads which from the installed vLLM's source, 0.26 on the
device, without importing it). Where pandas is missing, its ShareGPT dataset instead: a JSON list of
conversations, the first turn the prompt (never templated), --sharegpt-output-len N. Both shuffle
the prompts (seeded), which changes no figure here.

GPU (after the kit's unpack and `ballast.py --leave 12`; benchmarks/device/batch12.sh runs it in
the background and polls it):
    python3 benchmarks/batch12.py            # -> benchmark_results/batch_<h100|h200>.txt (+ the PNG)
Here (the fake vLLM and its fake `vllm bench serve`: the flow only):
    PYTHONPATH=tests/faults/fakevllm:. .venv/bin/python benchmarks/batch12.py --dry
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from card12 import GpuSampler, Run, new_home
from common import ROOT
from rotation12 import device_tag, vllm_version

PROFILE = "chat"
LEVELS = "1,2,4,8,16,32,64,128,256"
TEMPERATURE = 0.7  # sent by both clients (vLLM's bench sends none unless told: the server's default)
TARGET = 0.95
WORDS = ("river stone light garden market winter engine paper window story music number silver city forest "
         "morning road letter island bridge ocean mountain lamp clock field harbour station valley summer "
         "candle thread signal orchard compass meadow lantern quarry tide beacon").split()


# --- what is pure (tests/unit/test_batch12.py) -----------------------------------------------------------
def make_prompts(n: int, words: int = 190, seed: int = 23) -> list[str]:
    """n distinct prompts of about `words` words (about 200 tokens with the fixtures' SmolLM2 vocabulary), seeded."""
    rng = random.Random(seed)
    return [f"Prompt {i}: continue this text. " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


def write_inputs(texts: list[str], folder: Path) -> dict[str, Path]:
    """The same prompts as mm batch's INPUT.jsonl ("batch") and as vLLM's custom dataset ("custom":
    a "prompt" a line) and ShareGPT dataset ("sharegpt": a JSON list of two-turn conversations, the
    second turn's text unused when --sharegpt-output-len is given)."""
    files = {"batch": folder / "input.jsonl", "custom": folder / "dataset.jsonl", "sharegpt": folder / "sharegpt.json"}
    files["batch"].write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    files["custom"].write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    files["sharegpt"].write_text(json.dumps([{"conversations": [{"from": "human", "value": t},
                                                                 {"from": "gpt", "value": "..."}]} for t in texts]))
    return files


def dataset_args(files: dict[str, Path], output_len: int) -> list[str]:
    """vLLM bench serve's flags for our prompts as they are: its custom dataset where pandas (which
    vLLM reads it with) is installed, else its ShareGPT dataset (read with json, never templated)."""
    if importlib.util.find_spec("pandas") is not None:
        return ["--dataset-name", "custom", "--dataset-path", str(files["custom"]), skip_template_flag(),
                "--custom-output-len", str(output_len)]
    return ["--dataset-name", "sharegpt", "--dataset-path", str(files["sharegpt"]),
            "--sharegpt-output-len", str(output_len)]


def skip_template_flag(vllm_root: Path | None = None) -> str:
    """The custom dataset's flag for prompts sent as they are, as the installed vLLM spells it."""
    if vllm_root is None:
        spec = importlib.util.find_spec("vllm")  # finds the package without importing it
        vllm_root = Path(spec.origin).parent if spec and spec.origin else None
    for path in sorted((vllm_root / "benchmarks").rglob("*.py")) if vllm_root else []:
        if '"--custom-skip-chat-template"' in path.read_text(errors="replace"):
            return "--custom-skip-chat-template"
    return "--skip-chat-template"


def summary_seconds(stderr: str) -> float | None:
    """The wall time in mm batch's closing line ("wrote ...; 85.3 s wall, ..." or "1:25 wall")."""
    lines = [line for line in stderr.splitlines() if line.startswith("wrote ")]
    if not lines:
        return None
    found = re.search(r"; ([\d.]+) s wall", lines[-1]) or re.search(r"; ((?:\d+:)?\d+:\d\d) wall", lines[-1])
    if not found:
        return None
    if ":" not in found.group(1):
        return float(found.group(1))
    seconds = 0.0
    for part in found.group(1).split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


@dataclass
class Outcome:
    """One client's answer to the prompts."""
    who: str
    prompts: int
    concurrency: int
    tokens: int
    seconds: float  # the client's own measure
    wall_s: float  # its process, start-up included
    failed: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.who} prompts={self.prompts} concurrency={self.concurrency} out_tok_s={self.tok_s:.1f} "
                f"seconds={self.seconds:.2f} wall_s={self.wall_s:.2f} output_tokens={self.tokens} failed={self.failed}")


def ratio_line(batch: Outcome, bench: Outcome) -> str:
    ratio = batch.tok_s / bench.tok_s if bench.tok_s else 0.0
    return (f"batch_vs_bench ratio={ratio:.3f} batch_tok_s={batch.tok_s:.1f} bench_tok_s={bench.tok_s:.1f} "
            f"concurrency={batch.concurrency} prompts={batch.prompts}")


def knee_line(found: dict) -> str:
    def show(key: str, digits: int | None = None) -> str:
        v = found.get(key)
        return "n/a" if v is None else (f"{v:.{digits}f}" if digits is not None else str(v))
    return (f"knee={show('concurrency')} best_c={show('best_concurrency')} "
            f"best_out_tok_s={show('best_output_throughput', 1)} ttft_climbs_at={show('ttft_climbs_at')}")


# --- the run --------------------------------------------------------------------------------------------
def failed_line(run: Run, what: str, done: subprocess.CompletedProcess) -> None:
    run.line(f"# {what} failed (exit {done.returncode}):")
    for text in (done.stderr or done.stdout or "").strip().splitlines()[-6:]:
        run.line(f"#   {text[:300]}")


def the_sweep(run: Run, levels: str, force: list[str], png: Path) -> int | None:
    """`mm bench chat --sweep`: its levels' lines and the knee; None if it failed."""
    from mmlib.measure import sweep

    t0 = time.monotonic()
    done = run.mm("bench", PROFILE, "--sweep", "--levels", levels, *force, timeout=3600)
    if done.returncode:
        failed_line(run, "mm bench --sweep", done)
        return None
    path = max((Path(run.env["MM_RESULTS_DIR"]) / PROFILE).glob("*-sweep.json"))
    doc = json.loads(path.read_text())
    first = next(iter(doc["levels"].values()))["params"]
    run.line(f"# mm bench {PROFILE} --sweep: {time.monotonic() - t0:.0f} s; random dataset {first['input_len']} in / "
             f"{first['output_len']} out, ignore_eos; prompts per level: "
             + ", ".join(f"c={e['params']['max_concurrency']}:{e['params']['prompts']}" for e in doc["levels"].values()))
    for point in sweep.points(doc):
        run.line(point.line())
    run.line(knee_line(doc["knee"]))
    if doc.get("plot"):
        shutil.copy(path.with_name(doc["plot"]), png)
        run.line(f"# plot: {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    return doc["knee"].get("concurrency")


def fresh(run: Run, force: list[str]) -> None:
    """Sleep and wake the server: vLLM clears its prefix cache on sleep, so each client starts cold."""
    for verb, more in (("sleep", []), ("wake", force)):
        done = run.mm(verb, PROFILE, *more)
        if done.returncode:
            failed_line(run, f"mm {verb} {PROFILE}", done)


def bench_serve(run: Run, files: dict[str, Path], n: int, max_tokens: int, concurrency: int,
                work: Path) -> Outcome | None:
    from mmlib.measure.helper import tokenizer_path
    from mmlib.profiles.profile import load_profile

    chat = load_profile(PROFILE)
    name = "bench.json"
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "openai-chat",
            "--endpoint", "/v1/chat/completions", "--base-url", run.base, "--model", chat.served_model_name,
            "--tokenizer", tokenizer_path(chat.model), *dataset_args(files, max_tokens), "--ignore-eos",
            "--temperature", f"{TEMPERATURE:g}", "--num-prompts", str(n), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--seed", "0", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--save-result", "--result-dir", str(work), "--result-filename", name]
    run.line(f"# vllm bench serve {' '.join(argv[5:])}")
    t0 = time.monotonic()
    done = subprocess.run(argv, env=run.env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - t0
    (work / "bench.log").write_text(done.stdout + done.stderr)
    if done.returncode or not (work / name).exists():
        failed_line(run, "vllm bench serve", done)
        return None
    doc = json.loads((work / name).read_text())
    return Outcome("bench", n, concurrency, int(doc["total_output_tokens"]), float(doc["duration"]), wall,
                   int(doc["failed"]))


def mm_batch(run: Run, batch_input: Path, n: int, max_tokens: int, concurrency: int, work: Path,
             force: list[str]) -> Outcome | None:
    out = work / "output.jsonl"
    t0 = time.monotonic()
    done = run.mm("batch", PROFILE, str(batch_input), "-o", str(out), "--concurrency", str(concurrency),
                  "--ignore-eos", "--max-tokens", str(max_tokens), "--temperature", f"{TEMPERATURE:g}", *force,
                  timeout=3600)
    wall = time.monotonic() - t0
    (work / "batch.log").write_text(done.stdout + done.stderr)
    if done.returncode or not out.exists():
        failed_line(run, "mm batch", done)
        return None
    answers = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    said = [line for line in done.stderr.splitlines() if line.startswith(("batch ", "wrote "))]
    for line in said:
        run.line(f"# mm batch: {line[:300]}")
    seconds = summary_seconds(done.stderr)
    if seconds is None:
        run.line("# mm batch's closing line gave no wall time: seconds= is its process's")
    return Outcome("batch", n, concurrency, tokens, seconds or wall, wall, n - len({a["id"] for a in answers}))


def dry_profile(home: Path, max_tokens: int) -> None:
    """The fake chat server runs 16 requests at once (the profile's sequences), a token per 2 ms."""
    path = home / "config" / "profiles" / f"{PROFILE}.toml"
    doc = tomllib.loads(path.read_text())
    doc["env"] = {**doc.get("env", {}), "FAKE_MAX_RUNNING": "16", "FAKE_TOKENS": str(max_tokens),
                  "FAKE_TOKEN_DELAY": "0.002"}
    path.write_text(tomli_w.dumps(doc))
    (home / "config" / "config.toml").write_text("")  # the fake card has no 12 GiB to budget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="default: benchmark_results/batch_<device>.txt")
    ap.add_argument("--dry", action="store_true", help="the fake vLLM: the flow only")
    ap.add_argument("--levels", help=f"the sweep's concurrencies (default {LEVELS}; --dry: 1,4,16,64)")
    ap.add_argument("--prompts", type=int, help="default 1000 (--dry: 200)")
    ap.add_argument("--max-tokens", type=int, help="output tokens per answer (default 256; --dry: 32)")
    args = ap.parse_args()
    levels = args.levels or ("1,4,16,64" if args.dry else LEVELS)
    n = args.prompts or (200 if args.dry else 1000)
    max_tokens = args.max_tokens or (32 if args.dry else 256)
    gpu = GpuSampler()
    from mmlib.system import nvml

    report = nvml.probe(with_processes=False)
    tag = device_tag(gpu.name())
    work = Path(tempfile.mkdtemp(prefix="mm-batch12-"))
    out = args.out or (work / "batch12_dry.txt" if args.dry else ROOT / "benchmark_results" / f"batch_{tag}.txt")
    png = out.with_name(f"batch_sweep_{tag}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    hopper = gpu.available and tag in ("h100", "h200")
    env = new_home(args.dry, hopper, own_caches=False)
    env["MM_RESULTS_DIR"] = str(Path(env["MM_HOME"]) / "results")
    if args.dry:
        dry_profile(Path(env["MM_HOME"]), max_tokens)
    os.environ.update(MM_HOME=env["MM_HOME"], MM_CACHE_DIR=env["MM_CACHE_DIR"])  # for load_profile here
    run = Run(env, out)
    force = ["--force"] if args.dry else []  # the fake has few of vLLM's flags
    run.line(f"# benchmarks/batch12.py, {time.strftime('%Y-%m-%d %H:%M')}: device={tag} ({gpu.name()}) "
             f"driver={report.driver or '?'} vllm={vllm_version(args.dry)}")
    run.line(f"# card: {gpu.free() / 2**30:.2f} GiB free with nothing started (the ballast holds the rest); "
             f"{'no gpu_budget (dry)' if args.dry else 'gpu_budget 12GiB'}; profile {PROFILE} as shipped, its model "
             f"with random weights of the real shapes; {n} prompts x {max_tokens} output tokens (ignore_eos), "
             f"temperature {TEMPERATURE:g}, through mm's endpoint {run.base}")
    try:
        t0 = time.monotonic()
        up = run.mm("up", PROFILE, *force)
        if up.returncode:
            failed_line(run, f"mm up {PROFILE}", up)
            return
        run.line(f"# {PROFILE} started in {time.monotonic() - t0:.0f} s")
        knee = the_sweep(run, levels, force, png)
        if knee is None:
            return
        files = write_inputs(make_prompts(n), work)
        fresh(run, force)
        bench = bench_serve(run, files, n, max_tokens, knee, work)
        if bench:
            run.line(bench.line())
        fresh(run, force)
        batch = mm_batch(run, files["batch"], n, max_tokens, knee, work, force)
        if batch:
            run.line(batch.line())
        if bench and batch:
            run.line(ratio_line(batch, bench))
            run.line(f"# wall clock, start-up included: bench {bench.wall_s:.1f} s, batch {batch.wall_s:.1f} s; "
                     f"target ratio >= {TARGET}: {'met' if batch.tok_s >= TARGET * bench.tok_s else 'NOT met'}")
    finally:
        run.mm("daemon", "stop")
        print(f"# work files (inputs, outputs, logs): {work}", flush=True)


if __name__ == "__main__":
    main()
