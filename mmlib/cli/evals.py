"""`mm eval`: lm-evaluation-harness against a profile's server, scores saved beside the benchmarks."""
from __future__ import annotations

from typing import Any

import click

from mmlib.cli.bench import RichUI, interrupted, print_memory, resolve_profile, serve
from mmlib.measure.evals import DEFAULT_TASKS, LOCAL_TASK, QUICK_LIMIT
from mmlib.measure.scenarios import FULL, QUICK


def split_tasks(values: tuple[str, ...]) -> list[str]:
    names = [t.strip() for v in values for t in v.split(",") if t.strip()]
    return list(dict.fromkeys(names)) or list(DEFAULT_TASKS)


def print_eval(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from mmlib.measure.results import fmt, primary_metric

    table = Table(title=f"{doc['profile']}: lm-eval ({doc['mode']}, limit {doc.get('limit') or 'none'}, "
                        f"GPU: {doc['gpu']})", title_justify="left")
    for col in ("task", "metric", "score", "± stderr", "samples", "time"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, entry in doc.get("tasks", {}).items():
        metric, value, stderr = primary_metric(entry)
        table.add_row(name, metric, fmt(value, 3), fmt(stderr, 3), fmt(entry.get("samples")),
                      f"{entry.get('duration_s', 0):.0f} s")
    Console().print(table)
    print_memory(doc)


@click.command("eval")
@click.argument("profile", required=False)
@click.option("--quick", "mode", flag_value=QUICK, help=f"At most {QUICK_LIMIT} samples per task.")
@click.option("--full", "mode", flag_value=FULL, default=True, help="Every sample (the default).")
@click.option("--tasks", "tasks", multiple=True, metavar="TASK[,TASK...]",
              help=f"lm-eval tasks (repeatable or comma-separated; default: {', '.join(DEFAULT_TASKS)}). "
                   f"'{LOCAL_TASK}' is mm's small offline arithmetic task. Tasks that need log-likelihoods "
                   "(multiple choice) are refused: a chat API cannot serve them.")
@click.option("--limit", type=click.IntRange(1), help="At most this many samples per task (overrides --quick).")
@click.option("--concurrency", type=click.IntRange(1), help="Requests in flight (default: max_num_seqs, <= 32).")
@click.option("--force", is_flag=True, help="Skip the checks that run before a start.")
def eval_cmd(profile: str | None, mode: str, tasks: tuple[str, ...], limit: int | None, concurrency: int | None,
             force: bool) -> None:
    """Score PROFILE's model (default: the default profile) with lm-evaluation-harness through the
    server's chat-completions API. Datasets come from the Hugging Face hub on first use.

    Results go to benchmark_results/<profile>/ and benchmark_results/summary.md."""
    from rich.console import Console

    from mmlib.measure import evals
    from mmlib.measure.results import ResultFile

    p = resolve_profile(profile, "eval")
    names = split_tasks(tasks)
    with Console(stderr=True).status(f"checking {', '.join(names)} with lm-eval"):
        evals.check_tasks(names)
    limit = limit or (QUICK_LIMIT if mode == QUICK else None)
    server = serve(p, force)
    file = ResultFile(p.name, "eval")
    try:
        with RichUI() as ui:
            path, doc = evals.run(p, server, names, mode, limit, concurrency or evals.default_concurrency(p),
                                  ui=ui, file=file)
    except KeyboardInterrupt:
        interrupted(file)
    print_eval(doc)
    click.echo(f"saved {path}; summary in {path.parent.parent / 'summary.md'}")

