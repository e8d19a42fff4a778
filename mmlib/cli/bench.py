"""`mm bench` (vLLM's bench against a profile's server) and `mm compare` (two profiles side by side)."""
from __future__ import annotations

import sys
from typing import Any

import click

from mmlib.errors import MMError
from mmlib.measure.scenarios import CPU_QUICK_LENGTH_DIVISOR as CPU_DIVISOR
from mmlib.measure.scenarios import CPU_QUICK_MAX_PROMPTS as CPU_PROMPTS
from mmlib.measure.scenarios import FULL, QUICK, SCENARIOS, plan


def resolve_profile(name: str | None, verb: str) -> Any:
    """The profile to measure (default: the configured default); one server, not a stack."""
    from mmlib.profiles.config import load_config
    from mmlib.profiles.profile import load_profile

    profile = load_profile(name or load_config().default_profile)
    if profile.is_stack:
        raise MMError(f"`mm {verb}` measures one server and {profile.name} is a stack "
                      f"(fix: `mm {verb}` one of its members: {', '.join(profile.stack)})")
    return profile


def serve(profile: Any, force: bool) -> dict[str, Any]:
    """Make the profile's server answer (through the daemon); its snapshot, with mm's endpoint to
    measure it through."""
    from mmlib.cli.servers import activate
    from mmlib.profiles.config import client_api_key

    result = activate(profile.name, force=force, quiet=True)
    for s in result["servers"]:
        if s["profile"] == profile.name:
            return {**s, "endpoint": result["proxy"], "api_key": client_api_key()}
    raise MMError(f"the daemon started {profile.name} but did not report its server; see `mm status`")


class RichUI:
    """Progress bars on stderr: one per scenario or task, counting the server's finished requests."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
        self.task: Any = None

    def __enter__(self) -> "RichUI":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def begin(self, name: str, total: int | None) -> None:
        self.task = self.progress.add_task(name, total=total)

    def advance(self, done: float) -> None:
        total = self.progress.tasks[-1].total
        self.progress.update(self.task, completed=min(done, total) if total else done)

    def end(self, name: str, entry: dict[str, Any]) -> None:
        total = self.progress.tasks[-1].total or entry.get("samples") or 1
        self.progress.update(self.task, completed=total, total=total,
                             description=f"{name} [green]done[/] in {entry.get('duration_s', 0):.0f} s")


def interrupted(file: Any) -> None:
    where = f"; what finished is kept in {file.path} (\"complete\": false)" if file.path else ""
    click.echo(f"mm: interrupted{where}", err=True)
    sys.exit(130)


def mib(value: Any) -> str:
    from mmlib.measure.results import fmt

    return fmt(value, 0) + (" MiB" if isinstance(value, (int, float)) else "")


def print_memory(doc: dict[str, Any]) -> None:
    from mmlib.system.usage import NO_GPU

    m = doc.get("memory", {})
    peak = m.get("peak", {})
    gpu = "GPU: no GPU" if m.get("gpu") == NO_GPU else \
        f"GPU: server {mib(peak.get('gpu_server_mib'))} (whole device {mib(peak.get('gpu_device_mib'))})"
    click.echo(f"memory, peak while running: {gpu}; RAM: server {mib(peak.get('rss_mib'))}, "
               f"system in use {mib(peak.get('ram_used_mib'))}")


# Short headers: the table must stay readable in an 80-column terminal.
TERMINAL_COLUMNS = (("TTFT ms", "mean_ttft_ms"), ("P99 TTFT", "p99_ttft_ms"), ("TPOT ms", "mean_tpot_ms"),
                    ("out tok/s", "output_throughput"), ("peak", "max_output_tokens_per_s"),
                    ("all tok/s", "total_token_throughput"), ("failed", "failed"))


def short_load(params: dict[str, Any]) -> str:
    load = f"c={params['max_concurrency']}" if params.get("max_concurrency") else \
        (f"{params['request_rate']:g}/s" if params.get("request_rate") else "all")
    return f"{load} {params.get('input_len')}/{params.get('output_len')}"


def print_bench(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from mmlib.measure.results import fmt

    table = Table(title=f"{doc['profile']}: vLLM bench, {doc['mode']} (GPU: {doc['gpu']})", title_justify="left",
                  caption="load: c=concurrent or req/s, in/out tokens; TTFT/TPOT means in ms; tok/s: output, "
                          "peak output, input+output", caption_justify="left")
    table.add_column("scenario", no_wrap=True)
    table.add_column("load", no_wrap=True)
    table.add_column("n", justify="right")
    for col, _ in TERMINAL_COLUMNS:
        table.add_column(col, justify="right")
    for name, entry in doc.get("scenarios", {}).items():
        fig = entry.get("figures", {})
        table.add_row(name, short_load(entry["params"]), fmt(entry["params"].get("prompts")),
                      *(fmt(fig.get(k), 0) for _, k in TERMINAL_COLUMNS))
    Console().print(table)
    for name, entry in doc.get("scenarios", {}).items():
        for err in entry.get("errors", []):
            click.echo(f"{name}: a failed request said: {err}")
    if any(e["params"].get("scaled_for_cpu") for e in doc.get("scenarios", {}).values()):
        click.echo(f"(--quick on the CPU build: token lengths / {CPU_DIVISOR} and at most {CPU_PROMPTS} prompts "
                   f"per scenario)")
    print_memory(doc)


SWEEP_COLUMNS = (("c", "concurrency", 0), ("n", "prompts", 0), ("out tok/s", "output_tok_s", 0),
                 ("req/s", "req_s", 2), ("TTFT p50", "ttft_p50_ms", 0), ("TTFT p99", "ttft_p99_ms", 0),
                 ("TPOT p50", "tpot_p50_ms", 1), ("ITL p50", "itl_p50_ms", 1), ("failed", "failed", 0))


def print_sweep(doc: dict[str, Any], path: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from mmlib.measure import sweep
    from mmlib.measure.results import fmt

    first = next(iter(doc.get(sweep.SECTION, {}).values()), {}).get("params", {})
    table = Table(title=f"{doc['profile']}: concurrency sweep, {doc['mode']} (GPU: {doc['gpu']}; "
                        f"{first.get('input_len')} in / {first.get('output_len')} out)", title_justify="left",
                  caption="c: requests in flight; latencies in ms; tok/s: output", caption_justify="left")
    for col, _, _ in SWEEP_COLUMNS:
        table.add_column(col, justify="right")
    knee = (doc.get("knee") or {}).get("concurrency")
    for point in sweep.points(doc):
        cells = [fmt(getattr(point, key), digits) for _, key, digits in SWEEP_COLUMNS]
        table.add_row(*cells, style="bold" if point.concurrency == knee else None)
    Console().print(table)
    for name, entry in doc.get(sweep.SECTION, {}).items():
        for err in entry.get("errors", []):
            click.echo(f"{name}: a failed request said: {err}")
    click.echo(sweep.describe(doc.get("knee") or {}))
    if any(e["params"].get("scaled_for_cpu") for e in doc.get(sweep.SECTION, {}).values()):
        click.echo(f"(--quick on the CPU build: token lengths / {CPU_DIVISOR}, and at most {CPU_PROMPTS} prompts "
                   f"or c per level)")
    print_memory(doc)
    plot = f" and {path.with_name(doc['plot'])}" if doc.get("plot") else f" ({doc.get('plot_note')})"
    click.echo(f"saved {path}{plot}")
    if knee:
        click.echo(f"`mm batch {doc['profile']}` runs at concurrency {knee} from now on (remembered for this "
                   f"model, vLLM and card)")


def measured(p: Any, kind: str, force: bool, run: Any) -> tuple[Any, dict[str, Any]]:
    """Serve the profile, then `run(server, ui=, file=)` with progress bars into a result file of
    this kind; Ctrl-C keeps what finished and says where. (path, the result)."""
    from mmlib.measure.results import ResultFile

    server = serve(p, force)
    file = ResultFile(p.name, kind)
    try:
        with RichUI() as ui:
            return run(server, ui=ui, file=file)
    except KeyboardInterrupt:
        interrupted(file)
        raise  # (interrupted exits)


def run_sweep(p: Any, mode: str, levels: str | None, cpu: bool, prompts: int | None, input_len: int | None,
              output_len: int | None, force: bool) -> None:
    from mmlib.measure import sweep

    chosen = sweep.parse_levels(levels) if levels else (sweep.QUICK_LEVELS if mode == QUICK else sweep.LEVELS)
    plans = sweep.level_plans(chosen, mode, cpu, prompts, input_len, output_len)
    path, doc = measured(p, "sweep", force, lambda server, **kw: sweep.run(p, server, plans, mode, **kw))
    print_sweep(doc, path)


@click.command("bench")
@click.argument("profile", required=False)
@click.option("--quick", "mode", flag_value=QUICK, help="A few prompts per scenario (a minute or two).")
@click.option("--full", "mode", flag_value=FULL, default=True,
              help="Enough prompts for stable figures (the default).")
@click.option("--scenario", "scenarios", multiple=True, type=click.Choice(list(SCENARIOS)),
              help="Run only this scenario (repeatable): " + "; ".join(
                  f"{s.name}: {s.describe()}" for s in SCENARIOS.values()) + ".")
@click.option("--sweep", "sweep", is_flag=True,
              help="Throughput and latency against concurrency (1 to 256), plotted, with the knee: the "
                   "concurrency `mm batch` runs at. --quick: levels 1,4,16,64,256 and short answers.")
@click.option("--levels", metavar="C,C,...", help="With --sweep: the concurrencies to measure (e.g. 1,4,16,64).")
@click.option("--prompts", type=click.IntRange(1), help="Prompts per scenario or sweep level.")
@click.option("--input-len", type=click.IntRange(1), help="Input tokens per prompt (random dataset).")
@click.option("--output-len", type=click.IntRange(1), help="Output tokens per prompt (random dataset).")
@click.option("--force", is_flag=True, help="Skip the checks that run before a start.")
def bench(profile: str | None, mode: str, scenarios: tuple[str, ...], sweep: bool, levels: str | None,
          prompts: int | None, input_len: int | None, output_len: int | None, force: bool) -> None:
    """Measure PROFILE's server (default: the default profile) with vLLM's bench: TTFT, TPOT,
    throughput, failed requests, and GPU and RAM memory while it runs.

    Results go to benchmark_results/runs/<profile>/ and runs/summary.md (with plots); git ignores runs/.
    A sweep's result and plot go there too (<time>-sweep.json and .png)."""
    from mmlib.measure import bench as lib
    from mmlib.profiles.vllm_cmd import installed_vllm

    if sweep and scenarios:
        raise MMError("--sweep measures its own levels of concurrency, not --scenario "
                      "(fix: drop --scenario, or drop --sweep)")
    if levels and not sweep:
        raise MMError("--levels is for --sweep (fix: add --sweep)")
    p = resolve_profile(profile, "bench")
    install = installed_vllm()
    if install is None:
        raise MMError("vLLM is not installed in mm's environment (fix: run ./mm once to set it up)")
    if sweep:
        run_sweep(p, mode, levels, install.is_cpu, prompts, input_len, output_len, force)
        return
    plans = plan(list(scenarios), mode, install.is_cpu, prompts, input_len, output_len)
    path, doc = measured(p, "bench", force, lambda server, **kw: lib.run(p, server, plans, mode, **kw))
    print_bench(doc)
    click.echo(f"saved {path}; summary in {path.parent.parent / 'summary.md'}")


@click.command("compare")
@click.argument("a")
@click.argument("b")
def compare(a: str, b: str) -> None:
    """Put profiles A and B side by side (e.g. `mm compare baseline perf`) from their newest results."""
    from rich.console import Console
    from rich.table import Table

    from mmlib import paths
    from mmlib.measure.results import compare_rows, fmt, load_results

    rows = compare_rows(load_results(), a, b)
    table = Table(title=f"{a} vs {b} (newest results in {paths.results_dir()})", title_justify="left")
    for col, justify in (("", "left"), (a, "right"), (b, "right"), (f"{b} vs {a}", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r.label, fmt(r.a, r.digits), fmt(r.b, r.digits), r.change())
    Console().print(table)

