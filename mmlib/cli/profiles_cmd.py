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
def show(name: str) -> None:
    """Print NAME merged with what it extends, and the vLLM command line mm would run."""
    from mmlib import paths
    from mmlib.profiles.vllm_cmd import masked_env, server_argv, server_env, shell_line, wants_tcp

    p = load_profile(name)
    click.echo(f"# {p.name}, from {p.source}")
    click.echo(to_toml(p))
    if p.is_stack:
        click.echo(f"# a stack: `mm profiles show` each of {', '.join(p.stack)} for their command lines")
        return
    tcp = wants_tcp(p)
    argv = server_argv(p, (p.port or 0) if tcp else str(paths.sockets_dir() / f"{p.name}.sock"), python="python")
    env = masked_env(server_env(p, base={}))
    click.echo("# vLLM command line (port 0 = a free port picked at start):" if tcp else
               "# vLLM command line (on a unix socket only this user reaches; a free port where the "
               "installed vLLM lacks --uds):")
    click.echo(" ".join(f"{k}={v}" for k, v in env.items()) + (" " if env else "") + shell_line(argv))

