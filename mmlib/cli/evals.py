"""`mm eval`: lm-evaluation-harness against a profile's server, scores saved beside the benchmarks."""
from __future__ import annotations

from typing import Any

import click

from mmlib.cli.bench import RichUI, interrupted, print_memory, resolve_profile, serve
from mmlib.measure.evals import (
    CHAT_MAX_GEN_TOKS,
    DEFAULT_TASKS,
    LOCAL_TASKS,
    QUICK_LIMIT,
)
from mmlib.measure.scenarios import FULL, QUICK

EXAMPLES_SHOWN = 2
EXAMPLE_CHARS = 240


def split_tasks(values: tuple[str, ...]) -> list[str]:
    names = [t.strip() for v in values for t in v.split(",") if t.strip()]
    return list(dict.fromkeys(names)) or list(DEFAULT_TASKS)


def score_rows(name: str, entry: dict[str, Any]) -> list[list[str]]:
    """The task's headline first, then every other filter of the same metric beside it."""
    from mmlib.measure.results import fmt, headline_of

    head = headline_of(entry)
    metric, _, head_filter = head["metric"].partition(",")
    time = f"{entry.get('duration_s', 0):.0f} s"
    rows = [[name, metric, f"{head_filter or '-'} (headline)", fmt(head["value"], 3), fmt(head["stderr"], 3),
             fmt(entry.get("samples")), time]]
    for f in entry.get("filters") or []:
        if f["filter"] != head_filter:
            rows.append(["", "", f["filter"], fmt(f["value"], 3), fmt(f.get("stderr"), 3), "", ""])
    return rows


def one_line(text: str, limit: int = EXAMPLE_CHARS) -> str:
    """An answer on one line, its end kept (that is where the answer is)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else "..." + flat[-limit:]


def diagnosis_lines(name: str, diag: dict[str, Any]) -> list[str]:
    """Why a filter scored zero or far below another: counts per reason, then two answers."""
    lines = [f"{name}: {diag['summary']}"]
    for r in diag["reasons"]:
        lines.append(f"  {r['count']:>4}  {r['says']}")
    telling = next((r for r in diag["reasons"] if r["reason"] != "wrong"), diag["reasons"][0] if diag["reasons"]
                   else None)
    for ex in (telling or {}).get("examples", [])[:EXAMPLES_SHOWN]:
        read = ", ".join(f"{f} read {v!r}" for f, v in ex.get("read", {}).items())
        tokens = f", {ex['tokens']} tokens" if ex.get("tokens") is not None else ""
        lines.append(f"  e.g. doc {ex['doc_id']} (target {ex['target']}{tokens}; {read}):")
        lines.append(f"       {one_line(ex['answer']) or '(empty)'}")
    api = diag.get("api")
    if api:
        lines.append(f"  lm-eval's log: {api['failed_requests']} failed requests, {api['null_content']} without "
                     f"content, {api['unparsable_responses']} unreadable" + (f"; e.g. {api['example']}"
                                                                             if api.get("example") else ""))
    return lines


def settings_line(doc: dict[str, Any]) -> str:
    s = doc.get("settings") or {}
    shots = "few-shot examples as chat turns" if s.get("fewshot_as_multiturn") else \
        "few-shot examples in one message"
    length = f"answers up to {s.get('max_gen_toks')} tokens ({s.get('max_gen_toks_for')})"
    extra = f", gen_kwargs {s['gen_kwargs']}" if s.get("gen_kwargs") else ""
    changed = f"; changed by {' '.join(s['overrides'])}" if s.get("overrides") else \
        "; change with --no-multiturn, --max-gen-toks N, --gen-kwargs"
    return f"set-up: chat template, {shots}, {length}{extra}{changed}"


def print_eval(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from mmlib.measure.results import headline_of

    table = Table(title=f"{doc['profile']}: lm-eval ({doc['mode']}, limit {doc.get('limit') or 'none'}, "
                        f"GPU: {doc['gpu']})", title_justify="left")
    for col in ("task", "metric", "filter", "score", "± stderr", "samples", "time"):
        table.add_column(col, justify="left" if col in ("task", "metric", "filter") else "right")
    tasks = doc.get("tasks", {})
    for name, entry in tasks.items():
        for row in score_rows(name, entry):
            table.add_row(*row)
    Console().print(table)
    for name, entry in tasks.items():
        if len(entry.get("filters") or []) > 1:
            click.echo(f"{name}: headline {headline_of(entry)['metric']}: {headline_of(entry).get('reason')}")
        if entry.get("diagnosis"):
            click.echo("\n".join(diagnosis_lines(name, entry["diagnosis"])))
    click.echo(settings_line(doc))
    print_memory(doc)


@click.command("eval")
@click.argument("profile", required=False)
@click.option("--quick", "mode", flag_value=QUICK, help=f"At most {QUICK_LIMIT} samples per task.")
@click.option("--full", "mode", flag_value=FULL, default=True, help="Every sample (the default).")
@click.option("--tasks", "tasks", multiple=True, metavar="TASK[,TASK...]",
              help=f"lm-eval tasks (repeatable or comma-separated; default: {', '.join(DEFAULT_TASKS)}). "
                   f"mm's own offline tasks: {', '.join(LOCAL_TASKS)} (mm_gsm8k: GSM8K-format word problems "
                   "with gsm8k_cot's prompt and filters). Tasks that need log-likelihoods (multiple choice) are "
                   "refused: a chat API cannot serve them.")
@click.option("--limit", type=click.IntRange(1), help="At most this many samples per task (overrides --quick).")
@click.option("--concurrency", type=click.IntRange(1), help="Requests in flight (default: max_num_seqs, <= 32).")
@click.option("--multiturn/--no-multiturn", default=True,
              help="Few-shot examples as one chat turn each (the default), or folded into one user message "
                   "(lm-eval's --fewshot_as_multiturn false).")
@click.option("--max-gen-toks", type=click.IntRange(1), metavar="N",
              help=f"Longest answer in tokens, for every task (default: {CHAT_MAX_GEN_TOKS}, or half the profile's "
                   "max_model_len if less, for tasks that set no length of their own).")
@click.option("--gen-kwargs", metavar="ARGS",
              help="Generation arguments passed to lm-eval's --gen_kwargs, as key=value pairs "
                   "(temperature=0.6,top_p=0.95) or a JSON object.")
@click.option("--force", is_flag=True, help="Skip the checks that run before a start.")
def eval_cmd(profile: str | None, mode: str, tasks: tuple[str, ...], limit: int | None, concurrency: int | None,
             multiturn: bool, max_gen_toks: int | None, gen_kwargs: str | None, force: bool) -> None:
    """Score PROFILE's model (default: the default profile) with lm-evaluation-harness through the
    server's chat-completions API. Datasets come from the Hugging Face hub on first use.

    Every filter a task has is shown (e.g. gsm8k's strict-match beside flexible-extract); a score of
    zero, or far below another filter's, is explained from the answers lm-eval logged.
    Results go to benchmark_results/runs/<profile>/ and runs/summary.md; git ignores runs/."""
    from rich.console import Console

    from mmlib.measure import evals
    from mmlib.measure.results import ResultFile

    p = resolve_profile(profile, "eval")
    settings = evals.settings_for(p, multiturn, max_gen_toks, gen_kwargs)
    names = split_tasks(tasks)
    with Console(stderr=True).status(f"checking {', '.join(names)} with lm-eval"):
        evals.check_tasks(names)
    limit = limit or (QUICK_LIMIT if mode == QUICK else None)
    server = serve(p, force)
    file = ResultFile(p.name, "eval")
    try:
        with RichUI() as ui:
            path, doc = evals.run(p, server, names, mode, limit, concurrency or evals.default_concurrency(p),
                                  ui=ui, file=file, settings=settings)
    except KeyboardInterrupt:
        interrupted(file)
    print_eval(doc)
    click.echo(f"saved {path}; summary in {path.parent.parent / 'summary.md'}")
