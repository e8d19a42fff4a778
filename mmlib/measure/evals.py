"""`mm eval`: lm-evaluation-harness against a profile's server, through its chat-completions API.

lm-eval runs as a helper process, one task at a time (Ctrl-C keeps the finished tasks); its scores
come from the results JSON it writes (--output_path), never from its text, and the answers from the
samples it logs (--log_samples), which explain a low score (lm_eval_output). Tasks that need
log-likelihoods are refused before anything starts: a chat API returns text, not token scores.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mmlib import paths
from mmlib.errors import MMError
from mmlib.measure import helper, lm_eval_output, memory, results
from mmlib.measure.helper import Target

DEFAULT_TASKS = ("gsm8k_cot", "ifeval", "gpqa_main_cot_zeroshot")
QUICK_LIMIT = 30
TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
LOCAL_TASKS = tuple(sorted(p.name.removesuffix(".yaml.in") for p in TASKS_DIR.glob("*.yaml.in")))
NEEDS_LOGLIKELIHOOD = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")
CHECK_TIMEOUT_S = 300
CHAT_MAX_GEN_TOKS = 1024  # chat models reason for a few hundred tokens; lm-eval's default 256 cuts them
TOKENS_TIMEOUT_S = 120


LOCAL_TASKS = tuple(sorted(p.name.removesuffix(".yaml.in") for p in TASKS_DIR.glob("*.yaml.in")))


def prepare_tasks(workdir: Path) -> Path:
    """A folder for --include_path holding mm's own tasks, their data paths made absolute."""
    out = workdir / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for name in LOCAL_TASKS:
        data = (TASKS_DIR / f"{name}.jsonl").resolve()
        text = (TASKS_DIR / f"{name}.yaml.in").read_text().replace("@DATA@", str(data))
        (out / f"{name}.yaml").write_text(text)
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


@dataclass(frozen=True)
class Settings:
    """How lm-eval talks to a chat API, each recorded in the result: few-shot examples as chat turns
    (a user message and the model's reply each, as chat models are trained to read them) and room
    for chain-of-thought in tasks that set no answer length of their own."""
    fewshot_as_multiturn: bool = True
    max_gen_toks: int = CHAT_MAX_GEN_TOKS
    every_task: bool = False  # --max-gen-toks: the length applies to tasks that set their own too
    gen_kwargs: str | None = None  # passed through to lm-eval's --gen_kwargs
    overrides: tuple[str, ...] = ()

    def lm_eval_gen_kwargs(self) -> str | None:
        """--gen_kwargs for lm-eval: the user's, plus max_gen_toks when it is for every task."""
        if not self.every_task:
            return self.gen_kwargs
        if self.gen_kwargs and self.gen_kwargs.startswith("{"):
            return json.dumps({**json.loads(self.gen_kwargs), "max_gen_toks": self.max_gen_toks})
        return ",".join(filter(None, (self.gen_kwargs, f"max_gen_toks={self.max_gen_toks}")))

    def record(self) -> dict[str, Any]:
        return {"apply_chat_template": True, "fewshot_as_multiturn": self.fewshot_as_multiturn,
                "max_gen_toks": self.max_gen_toks,
                "max_gen_toks_for": "every task" if self.every_task else "tasks that set no length of their own",
                "gen_kwargs": self.gen_kwargs, "overrides": list(self.overrides)}


def default_max_gen_toks(profile: Any) -> int:
    """CHAT_MAX_GEN_TOKS, or half the server's context where that is less (the prompt needs the rest)."""
    context = profile.engine.get("max_model_len")
    if isinstance(context, int) and not isinstance(context, bool) and context > 1:
        return min(CHAT_MAX_GEN_TOKS, context // 2)
    return CHAT_MAX_GEN_TOKS


def settings_for(profile: Any, multiturn: bool = True, max_gen_toks: int | None = None,
                 gen_kwargs: str | None = None) -> Settings:
    """The defaults for a chat API with this run's overrides; MMError on a --gen-kwargs lm-eval can't read."""
    overrides = [] if multiturn else ["--no-multiturn"]
    if max_gen_toks:
        overrides.append(f"--max-gen-toks {max_gen_toks}")
    if gen_kwargs is not None:
        gen_kwargs = check_gen_kwargs(gen_kwargs, sets_length=bool(max_gen_toks))
        overrides.append(f"--gen-kwargs {gen_kwargs}")
    return Settings(fewshot_as_multiturn=multiturn, max_gen_toks=max_gen_toks or default_max_gen_toks(profile),
                    every_task=bool(max_gen_toks), gen_kwargs=gen_kwargs, overrides=tuple(overrides))


TOP_LEVEL_COMMA = re.compile(r",(?![^\[\]{}()]*[\]})])")  # a comma outside brackets, as lm-eval splits


def check_gen_kwargs(text: str, sets_length: bool) -> str:
    """lm-eval reads --gen_kwargs as a JSON object or key=value pairs; refuse anything else up front."""
    text = text.strip()
    example = "(fix: e.g. --gen-kwargs temperature=0.6,top_p=0.95 or a JSON object)"
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise MMError(f"--gen-kwargs {text!r} is not a JSON object {example}")
        keys = set(parsed)
    else:
        parts = [p for p in TOP_LEVEL_COMMA.split(text) if p.strip()]
        if not parts or any("=" not in p for p in parts):
            raise MMError(f"--gen-kwargs {text!r}: expected key=value pairs {example}")
        keys = {p.split("=", 1)[0].strip() for p in parts}
    if sets_length and keys & {"max_gen_toks", "max_tokens"}:
        raise MMError("--max-gen-toks and a length in --gen-kwargs both set the answer length (fix: give one)")
    return text


def lm_eval_argv(task: str, target: Target, include: Path, output: Path, limit: int | None,
                 concurrency: int, settings: Settings = Settings(), python: str = sys.executable) -> list[str]:
    # max_gen_toks in model_args is lm-eval's answer length for tasks that set none (gsm8k_cot sets none).
    model_args = (f"base_url={target.url}/v1/chat/completions,model={target.served_model_name},"
                  f"tokenizer_backend=None,num_concurrent={concurrency},max_retries=3,timeout=600,"
                  f"max_gen_toks={settings.max_gen_toks}")
    if target.api_key:
        model_args += f",auth_token={target.api_key}"
    # No "run" subcommand: lm-eval 0.4.8 has none, and later versions insert it themselves.
    argv = [python, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args", model_args,
            "--tasks", task, "--apply_chat_template", "--include_path", str(include),
            "--output_path", str(output), "--seed", "1234", "--log_samples"]
    # The bare flag means true; lm-eval >= 0.4.9 turns it on with the chat template unless told "false".
    argv += ["--fewshot_as_multiturn"] if settings.fewshot_as_multiturn else ["--fewshot_as_multiturn", "false"]
    gen_kwargs = settings.lm_eval_gen_kwargs()
    argv += ["--gen_kwargs", gen_kwargs] if gen_kwargs else []
    return argv + (["--limit", str(limit)] if limit else [])


def token_counter(tokenizer: str, python: str = sys.executable) -> Callable[[list[str]], list[int] | None]:
    """Counts tokens with the server's tokenizer in a helper process (transformers stays out of mm's);
    None where it cannot, and the diagnosis then estimates from length."""
    def count(texts: list[str]) -> list[int] | None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        try:
            proc = subprocess.run([python, "-m", "mmlib.measure.eval_runner", "tokens", tokenizer],
                                  input=json.dumps(texts), capture_output=True, text=True, env=env,
                                  timeout=TOKENS_TIMEOUT_S, cwd=paths.PROJECT_ROOT)
            counts = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
        except (subprocess.TimeoutExpired, OSError, ValueError, IndexError):
            return None
        return counts if isinstance(counts, list) and len(counts) == len(texts) else None
    return count


def log_since(log: Path, offset: int) -> str:
    if not log.exists():
        return ""
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def run_task(task: str, target: Target, include: Path, output: Path, limit: int | None, concurrency: int,
             settings: Settings, log: Path, on_progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    base = helper.finished_requests(target.url, target.api_key, target.served_model_name) if on_progress else None

    def tick() -> None:
        if on_progress and base is not None:
            now = helper.finished_requests(target.url, target.api_key, target.served_model_name)
            if now is not None:
                on_progress(now - base)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = log.stat().st_size if log.exists() else 0
    try:
        helper.run_helper(lm_eval_argv(task, target, include, output, limit, concurrency, settings), env, log,
                          tick, what=f"lm-eval ({task})")
    except MMError:
        refused = lm_eval_output.api_failure(log_since(log, start))
        if refused:  # the server's own words say more than lm-eval's traceback
            raise MMError(f"lm-eval ({task}) gave up: the server answered {refused} (see {log})") from None
        raise
    return lm_eval_output.read(output, task, log_since(log, start), settings.max_gen_toks,
                               token_counter(target.tokenizer))


def default_concurrency(profile: Any) -> int:
    return max(1, min(profile.max_num_seqs or 16, 32))


def run(profile: Any, server: dict[str, Any], tasks: Sequence[str], mode: str, limit: int | None,
        concurrency: int, ui: Any = None, root: Path | None = None,
        runner: Callable[..., dict[str, Any]] = run_task, sampler: Any = None,
        file: Any = None, settings: Settings | None = None) -> tuple[Path, dict[str, Any]]:
    """Evaluate each task against the server, sampling memory; saved after each task (see bench.run)."""
    ui = ui or helper.NullUI()
    settings = settings or settings_for(profile)
    target = helper.target_for(profile, server)
    sampler = sampler or memory.MemorySampler(target.pid).start()
    doc = results.base_doc("eval", profile, mode, server, memory.gpu_name(sampler.probe))
    doc.update(limit=limit, num_concurrent=concurrency, api="chat-completions", settings=settings.record())
    rec = results.Recorder(doc, "tasks", file or results.ResultFile(profile.name, "eval", root), sampler)
    log = helper.log_path(profile.name, "eval")
    with results.finishing(rec, root) as outcome, tempfile.TemporaryDirectory(prefix="mm-eval-") as work:
        include = prepare_tasks(Path(work))
        for task in dict.fromkeys(tasks):
            ui.begin(task, limit)
            out = Path(work) / "out" / task
            entry = rec.step(task, {"limit": limit, "num_concurrent": concurrency},
                             lambda: runner(task, target, include, out, limit, concurrency, settings, log,
                                            ui.advance))
            ui.end(task, entry)
    return outcome["path"], doc
