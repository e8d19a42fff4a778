"""`mm bench`: vLLM's own `vllm bench serve` against a profile's server, scenario by scenario.

vLLM's bench runs as a helper process (it imports vllm); its figures come from the result JSON it
saves (--save-result), never from its text. Scenarios are the seed's (latency, burst, heavy) plus
c10, the 10-concurrent point the seed's baseline-vs-perf table quotes.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mmlib.errors import MMError
from mmlib.measure import memory, results
from mmlib.measure.helper import (
    NullUI,
    Target,
    finished_requests,
    log_path,
    run_helper,
    target_for,
)
from mmlib.measure.scenarios import Plan

# What we keep of vLLM's result JSON (the rest, per-request lists included, stays in its file).
FIGURE_KEYS = (
    "completed", "failed", "duration", "request_throughput", "output_throughput", "max_output_tokens_per_s",
    "total_token_throughput", "max_concurrent_requests", "total_input_tokens", "total_output_tokens",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms",
)


def bench_argv(p: Plan, target: Target, result_dir: Path, filename: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "vllm.entrypoints.cli.main", "bench", "serve", *bench_args(p, target, result_dir, filename)]


def bench_args(p: Plan, target: Target, result_dir: Path, filename: str) -> list[str]:
    """What follows `vllm bench serve` for one scenario or sweep level."""
    argv = ["--backend", "vllm", "--endpoint", "/v1/completions", "--base-url", target.url,
            "--model", target.served_model_name, "--tokenizer", target.tokenizer,
            "--dataset-name", "random", "--random-input-len", str(p.input_len),
            "--random-output-len", str(p.output_len), "--ignore-eos", "--num-prompts", str(p.prompts),
            "--request-rate", "inf" if p.request_rate is None else f"{p.request_rate:g}",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "99",
            "--seed", "0", "--disable-tqdm",
            "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", filename]
    if p.max_concurrency:
        argv += ["--max-concurrency", str(p.max_concurrency)]
    if p.warmups:
        argv += ["--num-warmups", str(p.warmups)]
    return argv


def read_vllm_result(path: Path) -> dict[str, Any]:
    """Our figures from vLLM's saved result; the first distinct errors of failed requests."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MMError(f"vLLM's bench wrote no readable result ({path}: {e})") from None
    figures = {k: raw[k] for k in FIGURE_KEYS if k in raw and _finite(raw[k])}
    errors = list(dict.fromkeys(str(e).strip()[:300] for e in raw.get("errors") or [] if e))[:3]
    return {"figures": figures, **({"errors": errors} if errors else {})}


def _finite(v: Any) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def bench_env(target: Target) -> dict[str, str]:
    env = dict(target.env)
    if target.api_key:
        env["OPENAI_API_KEY"] = target.api_key  # vLLM's bench sends it as the bearer token
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def progress_ticker(target: Target, on_progress: Callable[[float], None] | None) -> Callable[[], None]:
    """A tick that reports the server's requests finished since now (warm-ups included)."""
    base = finished_requests(target.url, target.api_key, target.served_model_name) if on_progress else None

    def tick() -> None:
        if on_progress and base is not None:
            now = finished_requests(target.url, target.api_key, target.served_model_name)
            if now is not None:
                on_progress(now - base)
    return tick


def run_scenario(p: Plan, target: Target, workdir: Path, log: Path,
                 on_progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run one scenario; on_progress gets the requests finished so far (warm-ups included)."""
    filename = f"{p.scenario}.json"
    run_helper(bench_argv(p, target, workdir, filename), bench_env(target), log, progress_ticker(target, on_progress),
               what=f"vLLM's bench ({p.scenario})")
    return read_vllm_result(workdir / filename)


# --- one whole run ------------------------------------------------------------------------------------
def run(profile: Any, server: dict[str, Any], plans: list[Plan], mode: str, ui: Any = None,
        root: Path | None = None, runner: Callable[..., dict[str, Any]] = run_scenario,
        sampler: Any = None, file: Any = None, kind: str = "bench",
        section: str = "scenarios") -> tuple[Path, dict[str, Any]]:
    """Bench every plan against the server, sampling memory; returns the result file and document.

    The document is saved after each scenario; on Ctrl-C or a failure it is saved with what
    finished and "complete": false before the exception goes on. A sweep (measure/sweep.py) runs
    its levels through here as kind "sweep", section "levels", and leaves summary.md alone."""
    import tempfile

    ui = ui or NullUI()
    target = target_for(profile, server)
    sampler = sampler or memory.MemorySampler(target.pid).start()
    doc = results.base_doc(kind, profile, mode, server, memory.gpu_name(sampler.probe))
    rec = results.Recorder(doc, section, file or results.ResultFile(profile.name, kind, root), sampler)
    log = log_path(profile.name, "bench")
    with results.finishing(rec, root, summary=kind == "bench") as outcome, tempfile.TemporaryDirectory(prefix="mm-bench-") as work:
        for i, p in enumerate(plans):
            if i:
                time.sleep(0.5)  # let the server finish the last scenario's bookkeeping
            ui.begin(p.scenario, p.prompts + p.warmups)
            entry = rec.step(p.scenario, p.params(), lambda: runner(p, target, Path(work), log, ui.advance))
            ui.end(p.scenario, entry)
    return outcome["path"], doc
