"""`mm profiles`: list profiles, or show one merged with the exact vLLM command line."""
from __future__ import annotations

import click

from mmlib.profiles.profile import load_all, load_profile, to_toml


@click.group("profiles", invoke_without_command=True)
@click.pass_context
def profiles(ctx: click.Context) -> None:
    """List profiles (shipped ones and your own)."""
    if ctx.invoked_subcommand:
        return
    from rich.console import Console
    from rich.table import Table

    found, errors = load_all()
    table = Table()
    for col in ("profile", "model", "served as", "sleep", "description"):
        table.add_column(col)
    for p in found:
        model = "stack: " + ", ".join(p.stack) if p.is_stack else p.model
        sleep = f"level {p.sleep.level}" if p.sleep.enabled else "no"
        table.add_row(p.name, model, ", ".join(p.names) or "-", sleep if not p.is_stack else "-", p.description)
    console = Console()
    console.print(table)
    for e in errors:
        console.print(f"[red]broken[/]: {e}", markup=True, highlight=False)


@profiles.command("show")
@click.argument("name")
@click.option("--model", help="Show it serving this model (hub id or path) instead of its own, as `mm up "
              "--model` and `mm perf MODEL` would: sized to the new model's shapes.")
@click.option("--gpu-memory", metavar="SIZE", help="Size it for a card of this size (e.g. 12GiB) instead of "
              "this machine's GPU and config.toml's gpu_budget.")
def show(name: str, model: str | None, gpu_memory: str | None) -> None:
    """Print NAME merged with what it extends, what mm derives for the card (KV cache bytes, CUDA
    graphs, the predicted footprint), and the vLLM command line mm would run."""
    from mmlib import paths
    from mmlib.cli.check import _size
    from mmlib.profiles.profile import masked_env
    from mmlib.profiles.vllm_cmd import (
        UDS,
        server_argv,
        server_env,
        shell_line,
        wants_tcp,
    )

    size = _size(gpu_memory)
    p = load_profile(name)
    if model:
        p = p.with_model(model)
    click.echo(f"# {p.name}, from {p.source}" + (f", serving {p.model} instead of {p.base_model}"
                                                 if p.model_replaced else ""))
    click.echo(to_toml(p))
    if p.is_stack:
        click.echo(f"# a stack: `mm profiles show` each of {', '.join(p.stack)} for their command lines")
        return
    fp = _footprint(p, size)
    for line in _derived_lines(p, fp):
        click.echo(line)
    tcp = wants_tcp(p)
    listen = (p.port or 0) if tcp else str(paths.sockets_dir() / f"{p.name}.sock")
    argv = server_argv(p, listen, python="python", derived=fp.sizes if fp else None)
    env = masked_env(server_env(p, base={}))
    click.echo("# vLLM command line (port 0 = a free port picked at start):" if tcp else
               "# vLLM command line (on a unix socket only this user reaches; a free port where the "
               f"installed vLLM lacks {UDS}):")
    click.echo(" ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + shell_line(argv))


def _footprint(p, size: int | None):
    """The footprint on --gpu-memory's card, else this machine's (NVML and config.toml's gpu_budget)."""
    from mmlib.guard import checks, fit
    from mmlib.profiles.config import load_config
    from mmlib.system import nvml

    card = fit.sized_card(size) if size else fit.card(load_config(), nvml.probe(with_processes=False))
    spec, _ = checks.load_spec_quietly(lambda text: click.echo(f"mm: {text}", err=True))
    return checks.footprint(p, card, spec)


def _derived_lines(p, fp) -> list[str]:
    from mmlib.guard.fit import GIB
    from mmlib.profiles.vllm_cmd import SIZE_KEYS, derived_engine

    if fp.card is None:
        out = ["# no GPU answered and config.toml sets no gpu_budget: sized without a card "
               "(--gpu-memory 12GiB shows a card's sizes)"]
    else:
        out = [f"# predicted on {fp.card.label()}: {fp.summary(where=False)}"]
    derived = ", ".join(f"{k} = {v}" + (f" ({v / GIB:.2f} GiB)" if k == SIZE_KEYS["kv_cache_bytes"] else "")
                        for k, v in derived_engine(p, fp.sizes).items())
    if derived:
        out.append(f"# derived for vLLM: {derived}")
    out += [f"# note: {n}" for n in fp.notes]
    return out
