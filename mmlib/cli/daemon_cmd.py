"""`mm daemon`: run the daemon in the foreground, or stop the running one."""
from __future__ import annotations

import click

from mmlib.client import Client


@click.group("daemon", invoke_without_command=True)
@click.pass_context
def daemon(ctx: click.Context) -> None:
    """Run the mm daemon in the foreground (other commands start it in the background)."""
    if ctx.invoked_subcommand is None:
        from mmlib import daemon as daemon_mod

        daemon_mod.run()


@daemon.command("stop")
def daemon_stop() -> None:
    """Stop the daemon and every server it runs."""
    client = Client()
    if not client.alive():
        click.echo("mm daemon is not running")
        return
    client.post("/shutdown")
    click.echo("mm daemon stopping (servers are stopped first)")

