"""Data parallel against tensor parallel for the same model on two cards, through mm (issue 23, part 3):
one profile with `gpus = 2, parallel = "data"` (a replica on each card, vLLM's own data parallelism
behind the server's one endpoint), one with `parallel = "tensor"` (the model split over both), each
started by mm's daemon in turn and measured with `vllm bench serve` through mm's endpoint at a few
concurrencies, one line each, then the ratio data / tensor at each concurrency, side by side from
the same run. Beside them, what `mm check` predicted each card to hold and what NVML saw each card
hold once the server served (the tensor split's all-reduce buffers are an estimate until this runs).

The model is one of the kit's random-weight fixtures (`--load-format dummy`: real shapes, real
memory and speed, noise for text), served without sleep mode (mm refuses data parallel with it).

GPU (two cards or more; after the kit's unpack, see benchmarks/device/dp_vs_tp.sh):
    python3 benchmarks/dp_vs_tp.py --model .gpu-stage/models/dummy-7b-awq
        (writes benchmark_results/dp_vs_tp_<device>.txt, line by line as it goes)
Here (the fake vLLM on two fake cards: the flow, per-card placement and status; the numbers are the
fake's, from a small client of its own, since the fake has no `vllm bench`):
    python3 benchmarks/dp_vs_tp.py --dry
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
from common import ROOT, mm

FAKE_VLLM = ROOT / "tests" / "faults" / "fakevllm"
FAKE_GPU = ROOT / "tests" / "faults" / "fakegpu"
LAYOUTS = ("data", "tensor")
GIB = 1 << 30


def device_tag(gpu_name: str) -> str:
    """h100 or h200 from NVML's name; else the name, lower case, in one word."""
    for tag in ("h200", "h100"):
        if tag in gpu_name.lower():
            return tag
    return "".join(c for c in gpu_name.lower() if c.isalnum()) or "none"


class Out:
    """Lines printed and appended to the result file as they come (a cut run keeps what it did)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)

    def line(self, text: str) -> None:
        print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")


def dry_environment() -> None:
    """The fake vLLM and two fake 80 GiB cards (tests/faults) for this process and the daemon."""
    state = Path(tempfile.mkdtemp(prefix="mm-dp-vs-tp-gpu-"))
    os.environ.update(FAKE_GPU_DIR=str(state), FAKE_GPU_COUNT="2", FAKE_GPU_AWAKE_MIB="30720",
                      FAKE_TOKENS="64", FAKE_TOKEN_DELAY="0.002")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(FAKE_GPU), str(FAKE_VLLM), str(ROOT),
                                                os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sys.path[:0] = [str(FAKE_GPU), str(FAKE_VLLM)]


def new_home(model: str, dry: bool, max_model_len: int) -> dict:
    """A fresh MM_HOME with the two profiles: the same model and settings, laid out two ways."""
    home = Path(tempfile.mkdtemp(prefix="mm-dp-vs-tp-"))
    folder = home / "config" / "profiles"
    folder.mkdir(parents=True)
    for parallel in LAYOUTS:
        doc = {"description": f"{parallel} parallel over two cards (benchmarks/dp_vs_tp.py)",
               "model": model, "served_model_name": parallel, "gpus": 2, "parallel": parallel,
               "sleep": False, "startup_timeout": 900}
        doc["engine"] = {"max_model_len": max_model_len} if dry else \
            {"load_format": "dummy", "max_model_len": max_model_len}
        (folder / f"{parallel}.toml").write_text(tomli_w.dumps(doc))
    return {**os.environ, "MM_HOME": str(home), "MM_CACHE_DIR": str(home / "cache"), "HF_HUB_OFFLINE": "1",
            "MM_PROXY_PORT": str(8600 + random.randint(0, 300)),
            "MM_RUNTIME_DIR": tempfile.mkdtemp(prefix="mm-", dir="/tmp")}


def fake_model(env: dict) -> str:
    """A hub id in the scratch hub cache with an empty config (the fake loads nothing)."""
    snapshot = Path(env["MM_HOME"]) / "hf" / "models--fake--dp-vs-tp" / "snapshots" / "fake"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").touch()
    env["HF_HUB_CACHE"] = str(Path(env["MM_HOME"]) / "hf")
    return "fake/dp-vs-tp"


def status(env: dict) -> dict:
    return json.loads(mm(env, "status", "--json"))


def predicted_gib(name: str, capacity: int) -> float:
    """What `mm check` predicts one card of the profile to hold awake, on a card of `capacity`."""
    from mmlib.guard import checks

    return checks.predicted_gib(name, capacity)


def card_lines(env: dict, parallel: str) -> tuple[str, int]:
    """What each card held (NVML) with the server up, beside the prediction; the card's total."""
    doc = status(env)
    server = next(s for s in doc["servers"] if s["profile"] == parallel)
    held = (server.get("memory") or {}).get("cards") or {}
    cards = doc.get("cards") or []
    total = cards[0]["total"] if cards else 80 * GIB
    each = ", ".join(f"card {c} {mib / 1024:.2f}" for c, mib in sorted(held.items())) or "none seen"
    try:
        predicted = f"{predicted_gib(parallel, total):.2f}"
    except Exception as e:  # a model whose shapes guard.fit cannot read: the run goes on
        predicted = f"? ({type(e).__name__})"
    return (f"{parallel:>6} parallel on cards {server.get('gpus')}: predicted {predicted} GiB a card, held {each} GiB "
            f"(NVML, at rest after the runs)", total)


# --- load: vLLM's bench on a GPU, a small client of our own on the fake ---------------------------------
def vllm_bench(env: dict, parallel: str, model: str, concurrency: int, prompts: int, input_len: int,
               output_len: int, work: Path) -> dict:
    """`vllm bench serve` through mm's endpoint, as `mm bench` runs it; its saved figures."""
    from mmlib.measure.bench import bench_argv, read_vllm_result
    from mmlib.measure.helper import Target
    from mmlib.measure.scenarios import Plan

    plan = Plan(f"{parallel}-c{concurrency}", prompts, input_len, output_len, None, concurrency,
                warmups=min(concurrency, 16))
    target = Target(url=f"http://127.0.0.1:{env['MM_PROXY_PORT']}", served_model_name=parallel, tokenizer=model,
                    env=env)
    filename = f"{plan.scenario}.json"
    log = work / f"bench-{plan.scenario}.log"
    with open(log, "w") as f:
        r = subprocess.run(bench_argv(plan, target, work, filename), env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"vllm bench serve ({plan.scenario}) failed; its log: {log}\n{log.read_text()[-3000:]}")
    return read_vllm_result(work / filename)["figures"]


def fake_bench(env: dict, parallel: str, concurrency: int, prompts: int, output_len: int) -> dict:
    """The fake's throughput through mm's endpoint (for --dry: the flow, not a figure)."""
    import httpx

    url = f"http://127.0.0.1:{env['MM_PROXY_PORT']}/v1/completions"

    async def go() -> dict:
        done, tokens, ttfts = 0, 0, []
        queue = list(range(prompts))
        async with httpx.AsyncClient(timeout=300) as client:
            async def worker() -> None:
                nonlocal done, tokens
                while queue:
                    queue.pop()
                    t0 = time.perf_counter()
                    r = await client.post(url, json={"model": parallel, "prompt": "x", "max_tokens": output_len})
                    r.raise_for_status()
                    ttfts.append((time.perf_counter() - t0) * 1000)
                    tokens += r.json()["usage"]["completion_tokens"]
                    done += 1
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            took = time.perf_counter() - t0
        return {"completed": done, "duration": took, "output_throughput": tokens / took,
                "request_throughput": done / took, "median_ttft_ms": sorted(ttfts)[len(ttfts) // 2],
                "median_tpot_ms": 0.0}
    return asyncio.run(go())


def figure_line(parallel: str, concurrency: int, prompts: int, f: dict) -> str:
    return (f"{parallel:>6} c={concurrency:<4} {f.get('output_throughput', 0):>9,.0f} output tok/s  "
            f"{f.get('request_throughput', 0):6.2f} req/s  TTFT p50 {f.get('median_ttft_ms', 0):7.1f} ms  "
            f"TPOT p50 {f.get('median_tpot_ms', 0):6.2f} ms  ({f.get('completed', 0)}/{prompts} answered)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=".gpu-stage/models/dummy-7b-awq", help="a model folder (the kit's fixtures)")
    ap.add_argument("--concurrency", default="1,16,64,256", help="concurrencies, comma-separated")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=0, help="prompts at each concurrency (default: 4 x, at least 16)")
    ap.add_argument("--out", type=Path, help="default: benchmark_results/dp_vs_tp_<device>.txt")
    ap.add_argument("--dry", action="store_true", help="the fake vLLM on two fake cards: the flow only")
    args = ap.parse_args()
    if args.dry:
        dry_environment()
    from mmlib.system import nvml

    report = nvml.probe(with_processes=False)
    gpus = list(report.gpus or [])
    if len(gpus) < 2:
        raise SystemExit(f"dp_vs_tp needs two GPUs; NVML sees {len(gpus)} ({report.error or 'one'}): "
                         "run it on a machine with two or more, or --dry")
    tag = device_tag(gpus[0].name)
    out = Out(args.out or (Path(tempfile.gettempdir()) / "dp_vs_tp_dry.txt" if args.dry
                           else ROOT / "benchmark_results" / f"dp_vs_tp_{tag}.txt"))
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    model = str(Path(args.model).resolve()) if not args.dry else ""
    env = new_home(model, args.dry, args.max_model_len)
    if args.dry:
        model = fake_model(env)
        for parallel in LAYOUTS:  # the fake model's id in place of the folder
            path = Path(env["MM_HOME"]) / "config" / "profiles" / f"{parallel}.toml"
            path.write_text(path.read_text().replace('model = ""', f'model = "{model}"'))
    os.environ.update(MM_HOME=env["MM_HOME"], MM_CACHE_DIR=env["MM_CACHE_DIR"])  # for load_profile here
    from mmlib.profiles.vllm_cmd import installed_vllm

    install = installed_vllm()
    out.line(f"# benchmarks/dp_vs_tp.py, {time.strftime('%Y-%m-%d %H:%M')}: {len(gpus)}x {gpus[0].name} "
             f"(device={tag}{', dry: the fake vLLM' if args.dry else ''}), driver {report.driver or '?'}, "
             f"vLLM {install.version if install else '?'}")
    lengths = (f"random prompts {args.input_len} in / {args.output_len} out, vllm bench serve" if not args.dry
               else f"the fake's {os.environ['FAKE_TOKENS']} tokens an answer, a small client")
    out.line(f"# model {Path(args.model).name if not args.dry else model} (random weights), max_model_len "
             f"{args.max_model_len}, {lengths} through mm's endpoint")
    figures: dict[tuple[str, int], dict] = {}
    work = Path(tempfile.mkdtemp(prefix="mm-dp-vs-tp-bench-"))
    try:
        for parallel in LAYOUTS:
            t0 = time.monotonic()
            mm(env, "up", parallel, "--force")  # --force: a model folder of config files only (load_format dummy)
            out.line(f"{parallel:>6} parallel: up in {time.monotonic() - t0:.0f} s")
            for c in concurrencies:
                n = args.prompts or max(16, 4 * c)
                f = (fake_bench(env, parallel, c, n, args.output_len) if args.dry
                     else vllm_bench(env, parallel, model, c, n, args.input_len, args.output_len, work))
                figures[(parallel, c)] = f
                out.line(figure_line(parallel, c, n, f))
            out.line(card_lines(env, parallel)[0])
            mm(env, "stop", parallel)
        for c in concurrencies:
            dp, tp = (figures[(p, c)].get("output_throughput") or 0 for p in LAYOUTS)
            out.line(f"c={c:<4} data / tensor = {dp / tp:.2f} (output tok/s {dp:,.0f} / {tp:,.0f})" if tp else
                     f"c={c:<4} tensor parallel answered nothing")
    finally:
        subprocess.run([sys.executable, "-m", "mmlib", "daemon", "stop"], env=env, cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()
