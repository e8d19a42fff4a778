"""`mm eval`: lm-evaluation-harness against a profile's server, through its chat-completions API.

lm-eval runs as a helper process, one task at a time (Ctrl-C keeps the finished tasks); its scores
come from the results JSON it writes (--output_path), never from its text. Tasks that need
log-likelihoods are refused before anything starts: a chat API returns text, not token scores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from mmlib import paths
from mmlib.errors import MMError
from mmlib.measure import helper, memory, results
from mmlib.measure.helper import Target

DEFAULT_TASKS = ("gsm8k_cot", "ifeval", "gpqa_main_cot_zeroshot")
QUICK_LIMIT = 30
LOCAL_TASK = "mm_arith"  # ships with mm, runs offline
TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
NEEDS_LOGLIKELIHOOD = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")
CHECK_TIMEOUT_S = 300


def prepare_tasks(workdir: Path) -> Path:
    """A folder for --include_path holding mm's own tasks, their data paths made absolute."""
    out = workdir / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    data = (TASKS_DIR / f"{LOCAL_TASK}.jsonl").resolve()
    text = (TASKS_DIR / f"{LOCAL_TASK}.yaml.in").read_text().replace("@DATA@", str(data))
    (out / f"{LOCAL_TASK}.yaml").write_text(text)
    return out


def refusal(doc: dict[str, Any]) -> str | None:
    """The one-line reason the checked tasks cannot run, or None when all can."""
    for name, entry in doc.get("tasks", {}).items():
        if not entry.get("known"):
            hint = entry.get("suggest") or []
            fix = f"did you mean {' or '.join(hint)}?" if hint else "`lm-eval ls tasks` lists them"
            return f"lm-eval has no task '{name}' (fix: {fix})"
    for name, entry in doc.get("tasks", {}).items():
        bad = {leaf: t for leaf, t in entry.get("leaves", {}).items() if t in NEEDS_LOGLIKELIHOOD}
        if bad:
            leaf, kind = next(iter(bad.items()))
            which = f"'{name}'" if leaf == name else f"'{name}' ({len(bad)} of its tasks, e.g. {leaf})"
            return (f"task {which} is {kind}: it needs log-likelihoods, which a chat-completions API cannot "
                    f"serve (fix: pick generative tasks, e.g. {', '.join(DEFAULT_TASKS)})")
    return None


def check_tasks(tasks: Sequence[str], python: str = sys.executable) -> dict[str, Any]:
    """Ask lm-eval (in a helper process) what the tasks are; MMError if any cannot run here."""
    with tempfile.TemporaryDirectory(prefix="mm-eval-check-") as work:
        include = prepare_tasks(Path(work))
        try:
            proc = subprocess.run([python, "-m", "mmlib.measure.eval_runner", "check", "--include-path", str(include),
                                   *tasks], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
                                  cwd=paths.PROJECT_ROOT)
        except subprocess.TimeoutExpired:
            raise MMError(f"lm-eval did not list its tasks within {CHECK_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "No module named 'lm_eval'" in proc.stderr:
            raise MMError("mm eval needs lm-evaluation-harness (fix: pip install 'lm-eval[api]', "
                          "or ./mm's set-up with the eval extra)")
        raise MMError(f"lm-eval could not check the tasks: {last}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    reason = refusal(doc)
    if reason:
        raise MMError(reason)
    return doc


def lm_eval_argv(task: str, target: Target, include: Path, output: Path, limit: int | None,
                 concurrency: int, python: str = sys.executable) -> list[str]:
    model_args = (f"base_url={target.url}/v1/chat/completions,model={target.served_model_name},"
                  f"tokenizer_backend=None,num_concurrent={concurrency},max_retries=3,timeout=600")
    if target.api_key:
        model_args += f",auth_token={target.api_key}"
    # No "run" subcommand: lm-eval 0.4.8 has none, and later versions insert it themselves.
    argv = [python, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args", model_args,
            "--tasks", task, "--apply_chat_template", "--include_path", str(include),
            "--output_path", str(output), "--seed", "1234"]
    return argv + (["--limit", str(limit)] if limit else [])


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def primary_key(scores: dict[str, Any]) -> str | None:
    """The task's first "metric,filter" score (lm-eval lists the task's main metric first)."""
    numbers = [k for k in _numbers(scores) if "_stderr" not in k and k != "sample_len"]
    return next((k for k in numbers if "," in k), numbers[0] if numbers else None)


def read_lm_eval_results(output: Path, task: str) -> dict[str, Any]:
    """Scores of one task from the newest results_*.json lm-eval wrote under output."""
    files = sorted(output.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise MMError(f"lm-eval wrote no results for {task} under {output}")
    raw = json.loads(files[-1].read_text())
    scores = {**raw.get("results", {}), **raw.get("groups", {})}
    if not scores:
        raise MMError(f"lm-eval's results for {task} hold no scores ({files[-1]})")
    main = scores.get(task) or next(iter(scores.values()))
    metrics = {name: _numbers(v) for name, v in scores.items()}
    key = primary_key(main)
    stderr = main.get(key.replace(",", "_stderr,", 1)) if key else None
    higher = raw.get("higher_is_better", {}).get(task, {}).get(key.split(",")[0]) if key else None
    samples = sum(int(n.get("effective", 0)) for n in raw.get("n-samples", {}).values())
    return {"primary": {"metric": key or "-", "value": main.get(key) if key else None,
                        "stderr": stderr if isinstance(stderr, (int, float)) else None,
                        "higher_is_better": higher},
            "metrics": metrics, "samples": samples,
            "lm_eval": {"version": raw.get("lm_eval_version"), "git_hash": raw.get("git_hash")}}


def run_task(task: str, target: Target, include: Path, output: Path, limit: int | None, concurrency: int,
             log: Path, on_progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    base = helper.finished_requests(target.url, target.api_key) if on_progress else None

    def tick() -> None:
        if on_progress and base is not None:
            now = helper.finished_requests(target.url, target.api_key)
            if now is not None:
                on_progress(now - base)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    helper.run_helper(lm_eval_argv(task, target, include, output, limit, concurrency), env, log, tick,
                     what=f"lm-eval ({task})")
    return read_lm_eval_results(output, task)


def default_concurrency(profile: Any) -> int:
    return max(1, min(profile.max_num_seqs or 16, 32))


def run(profile: Any, server: dict[str, Any], tasks: Sequence[str], mode: str, limit: int | None,
        concurrency: int, ui: Any = None, root: Path | None = None,
        runner: Callable[..., dict[str, Any]] = run_task, sampler: Any = None,
        file: Any = None) -> tuple[Path, dict[str, Any]]:
    """Evaluate each task against the server, sampling memory; saved after each task (see bench.run)."""
    ui = ui or helper.NullUI()
    target = helper.target_for(profile, server)
    sampler = sampler or memory.MemorySampler(target.pid).start()
    doc = results.base_doc("eval", profile, mode, server, memory.gpu_name(sampler.probe))
    doc.update(limit=limit, num_concurrent=concurrency, api="chat-completions")
    rec = results.Recorder(doc, "tasks", file or results.ResultFile(profile.name, "eval", root), sampler)
    log = helper.log_path(profile.name, "eval")
    with results.finishing(rec, root) as outcome, tempfile.TemporaryDirectory(prefix="mm-eval-") as work:
        include = prepare_tasks(Path(work))
        for task in dict.fromkeys(tasks):
            ui.begin(task, limit)
            out = Path(work) / "out" / task
            entry = rec.step(task, {"limit": limit, "num_concurrent": concurrency},
                             lambda: runner(task, target, include, out, limit, concurrency, log, ui.advance))
            ui.end(task, entry)
    return outcome["path"], doc
