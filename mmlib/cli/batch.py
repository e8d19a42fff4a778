"""`mm batch`: generate for every prompt of a JSONL file through mm's endpoint, resumably."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from mmlib.cli.models_cmd import complete_profiles
from mmlib.errors import MMError


def serve_target(target: str, force: bool) -> tuple[Any, dict[str, Any]]:
    """Make TARGET answer as `mm chat TARGET` does (a profile, a model name mm knows, or a hub id);
    the profile and its server's snapshot, with mm's endpoint ("endpoint") and key ("api_key")."""
    from mmlib.cli.chat import resolve_target
    from mmlib.cli.servers import activate, default_profile
    from mmlib.profiles.config import client_api_key
    from mmlib.profiles.profile import load_profile

    name, model = resolve_target(target)
    profile = load_profile(name or default_profile())
    if profile.is_stack:
        raise MMError(f"`mm batch` sends to one server and {profile.name} is a stack "
                      f"(fix: `mm batch` one of its members: {', '.join(profile.stack)})")
    if model:
        profile = profile.with_model(model)
    result = activate(profile.name, model, force=force, quiet=True)
    for s in result["servers"]:
        if s["profile"] == profile.name:
            return profile, {**s, "endpoint": result["proxy"], "api_key": client_api_key()}
    raise MMError(f"the daemon started {profile.name} but did not report its server; see `mm status`")


def profile_temperature(profile: Any) -> float | None:
    """The temperature the profile gives requests that set none, where it says (greedy takes no n)."""
    import json

    config = profile.engine.get("override_generation_config")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return None
    value = config.get("temperature") if isinstance(config, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@click.command("batch")
@click.argument("target", metavar="PROFILE|MODEL", shell_complete=complete_profiles)
@click.argument("input_path", metavar="INPUT.jsonl", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where the answers go (JSONL, appended to; running again resumes it).")
@click.option("-n", "--samples", type=click.IntRange(1), default=1, show_default=True,
              help="Samples per prompt (one request asks for them all: one prefill).")
@click.option("--temperature", type=click.FloatRange(0), help="Sampling temperature (default: the profile's).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling (default: the profile's).")
@click.option("--max-tokens", type=click.IntRange(1), help="Longest answer (default: the profile's).")
@click.option("--seed", type=int, help="Sample k of every prompt is drawn with seed+k: reruns repeat it.")
@click.option("--concurrency", type=click.IntRange(1), help="Requests in flight (default: the best one "
              "measured for the profile, see `mm bench --sweep`).")
@click.option("--retries", type=click.IntRange(0, 10), default=3, show_default=True,
              help="Retries of a request that failed for the transport, a 5xx or a 429.")
@click.option("--ignore-eos", is_flag=True, help="Generate to --max-tokens whatever the model says "
              "(benchmarks, random weights).")
@click.option("--force", is_flag=True, help="Skip the checks that run before a start.")
def batch(target: str, input_path: Path, output: Path, samples: int, temperature: float | None,
          top_p: float | None, max_tokens: int | None, seed: int | None, concurrency: int | None,
          retries: int, ignore_eos: bool, force: bool) -> None:
    """Answer every line of INPUT.jsonl with PROFILE|MODEL (as for `mm chat`), SAMPLES times each,
    into OUTPUT.

    INPUT: one JSON object a line, {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]},
    optionally with its own "max_tokens" and "temperature". OUTPUT: one line per (id, sample):
    {"id", "sample", "text", "finish_reason", "usage", "model"}. Interrupted (Ctrl-C, a crash, a
    reboot)? Run the same command again: it sends only what is missing. Requests that failed after
    their retries are listed in OUTPUT's .errors.jsonl and sent again by the next run."""
    import asyncio

    from mmlib.batch import inputs, progress, requests
    from mmlib.batch.runner import RetryPolicy, Runner
    from mmlib.batch.store import ErrorLog, OutputStore, errors_path

    index = inputs.scan(input_path)
    if output.exists() and input_path.exists() and os.path.samefile(output, input_path):
        raise MMError(f"{output}: that is the input (fix: -o another file)")
    total = len(index) * samples
    with OutputStore.open(output, index.lines, str(input_path)) as store:
        rec = store.recovered
        if rec.torn_bytes:
            click.echo(f"{output}: cut off a torn last line ({rec.torn_bytes} bytes) a crash left", err=True)
        done = rec.done_within(samples)
        extra = rec.lines - done
        if done:
            click.echo(f"resuming: {done:,} of {total:,} samples already in {output} (kept as they are; the "
                       f"options apply to the missing ones)" + (f"; {extra:,} more beyond -n {samples} kept too"
                                                                 if extra else ""), err=True)
        if done == total:
            errors_path(output).unlink(missing_ok=True)
            click.echo(f"nothing to do: all {total:,} samples of {len(index):,} prompts are in {output}", err=True)
            return
        profile, server = serve_target(target, force)
        model = server["served_model_name"]
        others = rec.models - {model}
        if others:
            raise MMError(f"{output} holds samples of {', '.join(sorted(others))} and this run's model is {model}"
                          f" (fix: -o a new file, or `mm batch {sorted(others)[0]} ...`)")
        if concurrency is None:
            from mmlib.measure.sweep import best_concurrency

            concurrency, source = best_concurrency(profile, server)
        else:
            source = "--concurrency"
        todo = total - done
        click.echo(f"batch {profile.name} ({model}): {len(index):,} prompts x {samples} = {total:,} samples, "
                   f"{todo:,} to make; concurrency {concurrency}: {source}", err=True)
        settings = requests.Settings(samples, temperature, top_p, max_tokens, seed, ignore_eos,
                                     profile_temperature(profile))
        if samples > 1 and requests.is_greedy(temperature if temperature is not None else settings.default_temperature):
            click.echo(f"note: temperature 0{'' if temperature is not None else ' (the profile default)'} is greedy: "
                       f"a prompt's {samples} samples will be alike (fix: --temperature 0.7, say)", err=True)
        stats = progress.Stats(total=total, done_before=done)
        errors = ErrorLog(errors_path(output))
        runner = Runner(server["endpoint"], server.get("api_key"), min(concurrency, todo), store, errors, stats,
                        RetryPolicy(retries), progress.progress_for(f"batch {profile.name}", stats))
        jobs = requests.plan(inputs.read(input_path), rec.done, model, settings)
        try:
            asyncio.run(runner.run(jobs))
        finally:
            errors.close()
    click.echo(progress.summary(stats, str(output)), err=True)
    again = "mm " + shlex.join(sys.argv[1:])
    if stats.failed_requests:
        click.echo(f"{stats.failed_requests:,} requests failed: see {errors.path}; `{again}` sends them again",
                   err=True)
    if stats.aborted:
        click.echo(f"mm: {stats.aborted}", err=True)
    if stats.interrupted:
        click.echo(f"mm: interrupted; what finished is kept in {output}. To resume: {again}", err=True)
        sys.exit(130)
    if stats.failed_requests or stats.aborted:
        sys.exit(1)
