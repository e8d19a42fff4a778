"""`mm check` (a profile against the installed vLLM and this GPU) and `mm doctor` (the machine)."""
from __future__ import annotations

import json
import sys

import click

from mmlib.cli.models_cmd import complete_profiles

STYLE = {"error": "red", "fail": "red", "warn": "yellow", "info": "cyan", "ok": "green"}


def _terminal() -> bool:
    return sys.stdout.isatty()


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    from mmlib.profiles.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("check")
@click.argument("profile", required=False, shell_complete=complete_profiles)
@click.option("--gpu-memory", metavar="SIZE", help="Check the fit for a card of this size (e.g. 12GiB) instead of "
              "this machine's GPU.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quiet", "-q", is_flag=True, help="Errors and warnings only.")
def check(profile: str | None, gpu_memory: str | None, as_json: bool, quiet: bool) -> None:
    """Check PROFILE (default: every profile) against the installed vLLM and the GPU before it starts.

    Unknown or removed vLLM arguments (asked of vLLM's own parser), known bad combinations, and
    whether the model fits its share of GPU memory. Exits 1 when a profile would not start."""
    from mmlib.guard import checks

    size = _size(gpu_memory)
    from mmlib.cli.servers import own_servers

    ports, pids = own_servers()
    found = checks.check([profile] if profile else None, gpu_memory=size, own_ports=ports, mm_pids=pids,
                         announce=lambda text: click.echo(f"mm: {text}", err=True))
    if quiet:
        found = [f for f in found if f.severity != "info"]
    errors = sum(f.severity == "error" for f in found)
    if as_json:
        click.echo(json.dumps([f.__dict__ for f in found], indent=2))
    elif not found:
        click.echo("no problems found")
    else:
        if _terminal():
            from rich.console import Console
            from rich.table import Table

            table = Table()
            for col in ("", "file", "key", "problem", "fix"):
                table.add_column(col, overflow="fold")
            for f in found:
                table.add_row(f"[{STYLE.get(f.severity, '')}]{f.severity}[/]", _short(f.file), f.key, f.message, f.fix)
            Console().print(table)
        else:  # piped: one line per finding, for grep and logs
            for f in found:
                click.echo(f"{f.severity:5}  {f.line()}")
        warns = sum(f.severity == "warn" for f in found)
        force = any(f.severity == "error" and f.rule != "profile" for f in found)
        click.echo(f"{errors} error(s), {warns} warning(s)" + (" (`mm up --force` starts anyway)" if force else ""))
    if errors:
        sys.exit(1)


def _short(path: str) -> str:
    import os

    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home != "/" and path.startswith(home + "/") else path


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Check this machine: GPU, driver and CUDA, who holds GPU memory, vLLM, torch, FlashInfer,
    Python, disk for models, and the daemon. Exits 1 when something would stop mm from serving."""
    from mmlib.guard import doctor as doctor_mod
    from mmlib import paths
    from mmlib.serve.client import Client
    from mmlib.system import systemd

    lines = doctor_mod.run(daemon_alive=Client(timeout=2.0).alive, daemon_socket=str(paths.daemon_socket()),
                           service_state=systemd.state)
    if as_json:
        click.echo(json.dumps([line.__dict__ for line in lines], indent=2))
    elif _terminal():
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=False, box=None, pad_edge=False)
        for _ in range(4):
            table.add_column(overflow="fold")
        for line in lines:
            table.add_row(f"[{STYLE[line.status]}]{line.status}[/]", line.what, line.detail,
                          f"[dim]{line.hint}[/]" if line.hint else "")
        Console().print(table)
    else:
        width = max(len(line.what) for line in lines)
        for line in lines:
            hint = f" (hint: {line.hint})" if line.hint else ""
            click.echo(f"{line.status:4}  {line.what:{width}}  {line.detail}{hint}")
    if any(line.status == "fail" for line in lines):
        sys.exit(1)

