"""`mm bench`: vLLM's own `vllm bench serve` against a profile's server, scenario by scenario.

vLLM's bench runs as a helper process (it imports vllm); its figures come from the result JSON it
saves (--save-result), never from its text. Scenarios are the seed's (latency, burst, heavy) plus
c10, the 10-concurrent point the seed's baseline-vs-perf table quotes.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mmlib import paths
from mmlib.errors import MMError

QUICK, FULL = "quick", "full"
# On a CPU build --quick divides token lengths by this and caps the prompts, so a quick run of the
# embedded model finishes in about a minute per scenario; the result records what actually ran.
CPU_QUICK_LENGTH_DIVISOR = 4
CPU_QUICK_MAX_PROMPTS = 16
TICK_S = 0.5

# What we keep of vLLM's result JSON (the rest, per-request lists included, stays in its file).
FIGURE_KEYS = (
    "completed", "failed", "duration", "request_throughput", "output_throughput", "max_output_tokens_per_s",
    "total_token_throughput", "max_concurrent_requests", "total_input_tokens", "total_output_tokens",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms",
)


@dataclass(frozen=True)
class Scenario:
    name: str
    input_len: int
    output_len: int
    quick_prompts: int
    full_prompts: int
    request_rate: float | None = None  # requests per second; None sends all at once
    max_concurrency: int | None = None

    def describe(self) -> str:
        load = f"request rate {self.request_rate:g}/s" if self.request_rate else f"{self.max_concurrency} concurrent"
        return f"{load}, {self.input_len} in / {self.output_len} out"


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("latency", 256, 256, quick_prompts=10, full_prompts=120, request_rate=1.0),
    Scenario("c10", 256, 256, quick_prompts=30, full_prompts=300, max_concurrency=10),
    Scenario("burst", 128, 256, quick_prompts=50, full_prompts=500, max_concurrency=50),
    Scenario("heavy", 512, 512, quick_prompts=100, full_prompts=1000, max_concurrency=100),
)}


@dataclass(frozen=True)
class Plan:
    """One scenario as it will run: the numbers handed to `vllm bench serve`."""
    scenario: str
    prompts: int
    input_len: int
    output_len: int
    request_rate: float | None
    max_concurrency: int | None
    warmups: int
    scaled_for_cpu: bool = False

    def params(self) -> dict[str, Any]:
        return asdict(self)


def plan(names: Sequence[str], mode: str, cpu: bool, prompts: int | None = None,
         input_len: int | None = None, output_len: int | None = None) -> list[Plan]:
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise MMError(f"unknown scenario '{unknown[0]}' (fix: one of {', '.join(SCENARIOS)})")
    out = []
    for name in dict.fromkeys(names or SCENARIOS):  # keeps the order given, drops repeats
        s = SCENARIOS[name]
        n, i, o = (s.quick_prompts if mode == QUICK else s.full_prompts), s.input_len, s.output_len
        scaled = cpu and mode == QUICK
        if scaled:
            n, i, o = min(n, CPU_QUICK_MAX_PROMPTS), i // CPU_QUICK_LENGTH_DIVISOR, o // CPU_QUICK_LENGTH_DIVISOR
        out.append(Plan(name, prompts or n, input_len or i, output_len or o, s.request_rate, s.max_concurrency,
                        warmups=0 if mode == QUICK else 2, scaled_for_cpu=scaled))
    return out


@dataclass(frozen=True)
class Target:
    """The server to measure: reached directly, not through mm's proxy."""
    url: str
    served_model_name: str
    tokenizer: str
    env: dict[str, str]
    pid: int | None = None
    api_key: str | None = None


def tokenizer_path(model: str) -> str:
    """The local folder (or hub id) whose tokenizer the server loaded."""
    from mmlib.vllm_cmd import resolve_model

    path = resolve_model(model)
    if not os.path.isabs(path) and (paths.PROJECT_ROOT / path).exists():
        return str(paths.PROJECT_ROOT / path)  # the daemon starts servers in the project root
    return path


def bench_argv(p: Plan, target: Target, result_dir: Path, filename: str, python: str = sys.executable) -> list[str]:
    argv = [python, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
            "--backend", "vllm", "--endpoint", "/v1/completions", "--base-url", target.url,
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


# --- helper processes (vLLM's bench here, lm-eval in mmlib.evals) -----------------------------------
def run_helper(argv: list[str], env: dict[str, str], log: Path, on_tick: Callable[[], None] | None = None,
               what: str = "the helper") -> None:
    """Run argv to completion, its output appended to log, ticking on_tick every TICK_S.

    Its own session: a terminal's Ctrl-C reaches mm alone, which then ends the helper's whole
    group and re-raises, so the caller can keep what finished."""
    with open(log, "ab") as out:
        out.write(f"\n# mm: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while proc.poll() is None:
            if on_tick:
                on_tick()
            try:
                proc.wait(TICK_S)
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        _end_group(proc)
        raise
    if proc.returncode != 0:
        from mmlib.supervisor import log_tail

        tail = [line for line in log_tail(log, 40) if not line.startswith((" - leaked", "nanobind"))][-3:]
        raise MMError(f"{what} failed (exit {proc.returncode}); see {log}" + (f": {tail[-1]}" if tail else ""))


def _end_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue


def finished_requests(url: str, api_key: str | None = None) -> float | None:
    """Requests the server has finished so far (vLLM's Prometheus counter), for progress bars."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url}/metrics", headers=headers, timeout=1.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    total, seen = 0.0, False
    for line in r.text.splitlines():
        if line.startswith("vllm:request_success_total"):
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except (IndexError, ValueError):
                continue
    return total if seen else None


def bench_env(target: Target) -> dict[str, str]:
    env = dict(target.env)
    if target.api_key:
        env["OPENAI_API_KEY"] = target.api_key  # vLLM's bench sends it as the bearer token
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_scenario(p: Plan, target: Target, workdir: Path, log: Path,
                 on_progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Run one scenario; on_progress gets the requests finished so far (warm-ups included)."""
    filename = f"{p.scenario}.json"
    base = finished_requests(target.url, target.api_key) if on_progress else None

    def tick() -> None:
        if on_progress and base is not None:
            now = finished_requests(target.url, target.api_key)
            if now is not None:
                on_progress(now - base)

    run_helper(bench_argv(p, target, workdir, filename), bench_env(target), log, tick,
               what=f"vLLM's bench ({p.scenario})")
    return read_vllm_result(workdir / filename)


def log_path(profile: str, kind: str) -> Path:
    return paths.logs_dir() / f"{kind}-{profile}.log"


# --- one whole run ------------------------------------------------------------------------------------
class NullUI:
    """What a run reports as it goes; the CLI's rich progress bars implement the same three calls."""

    def begin(self, name: str, total: int | None) -> None: ...
    def advance(self, done: float) -> None: ...
    def end(self, name: str, entry: dict[str, Any]) -> None: ...


def target_for(profile: Any, server: dict[str, Any]) -> Target:
    from mmlib.vllm_cmd import server_env

    if not server.get("url"):
        raise MMError(f"{profile.name}: the server has no URL (state {server.get('state')}); see `mm status`")
    return Target(url=server["url"], served_model_name=server["served_model_name"],
                  tokenizer=tokenizer_path(server.get("model") or profile.model), env=server_env(profile),
                  pid=server.get("pid"), api_key=profile.api_key)


def run(profile: Any, server: dict[str, Any], plans: list[Plan], mode: str, ui: Any = None,
        root: Path | None = None, runner: Callable[..., dict[str, Any]] = run_scenario,
        sampler: Any = None, file: Any = None) -> tuple[Path, dict[str, Any]]:
    """Bench every plan against the server, sampling memory; returns the result file and document.

    The document is saved after each scenario; on Ctrl-C or a failure it is saved with what
    finished and "complete": false before the exception goes on."""
    import tempfile

    from mmlib import memory, results

    ui = ui or NullUI()
    target = target_for(profile, server)
    sampler = sampler or memory.MemorySampler(target.pid).start()
    doc = results.base_doc("bench", profile, mode, server, memory.gpu_name(sampler.probe))
    rec = results.Recorder(doc, "scenarios", file or results.ResultFile(profile.name, "bench", root), sampler)
    log = log_path(profile.name, "bench")
    with results.finishing(rec, root) as outcome, tempfile.TemporaryDirectory(prefix="mm-bench-") as work:
        for i, p in enumerate(plans):
            if i:
                time.sleep(0.5)  # let the server finish the last scenario's bookkeeping
            ui.begin(p.scenario, p.prompts + p.warmups)
            entry = rec.step(p.scenario, p.params(), lambda: runner(p, target, Path(work), log, ui.advance))
            ui.end(p.scenario, entry)
    return outcome["path"], doc
