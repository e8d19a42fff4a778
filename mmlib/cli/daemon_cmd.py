"""`mm daemon`: run the daemon in the foreground, or stop the running one."""
from __future__ import annotations

import os
import signal

import click

from mmlib import paths
from mmlib.errors import MMError
from mmlib.serve.client import Client, KeyRefused


@click.group("daemon", invoke_without_command=True)
@click.option("--host", help="Address of the OpenAI endpoint (default 127.0.0.1; config: proxy_host).")
@click.option("--port", type=int, help="Port of the OpenAI endpoint (default 8000; config: proxy_port).")
@click.option("--api-key", help="Require this key on the endpoint and the control API (config: api_key).")
@click.pass_context
def daemon(ctx: click.Context, host: str | None, port: int | None, api_key: str | None) -> None:
    """Run the mm daemon in the foreground (other commands start it in the background)."""
    if ctx.invoked_subcommand is None:
        from mmlib.serve import daemon as daemon_mod

        for var, value in (("MM_PROXY_HOST", host), ("MM_PROXY_PORT", port), ("MM_API_KEY", api_key)):
            if value is not None:
                os.environ[var] = str(value)  # load_config reads these over config.toml
        daemon_mod.run()


@daemon.command("stop")
def daemon_stop() -> None:
    """Stop the daemon and every server it runs."""
    client = Client()
    if not client.alive():
        click.echo("mm daemon is not running")
        return
    try:
        pid = client.post("/shutdown")["pid"]
    except KeyRefused:
        pid = client.daemon_pid()  # this user's own daemon: SIGTERM stops it as /shutdown does
        if pid is None:
            raise
        os.kill(pid, signal.SIGTERM)
    click.echo("mm daemon stopping: its servers first ...", err=True)
    if not wait_gone(pid, DAEMON_STOP_TIMEOUT_S):
        raise MMError(f"the mm daemon (pid {pid}) is still stopping after {DAEMON_STOP_TIMEOUT_S:.0f} s; "
                      f"see {paths.daemon_log()}")
    click.echo("mm daemon stopped")


DAEMON_STOP_TIMEOUT_S = 120.0  # servers get 15 s of SIGTERM grace each, in parallel


def wait_gone(pid: int, timeout: float) -> bool:
    """Until the process has exited: its servers are gone and nothing more can be accepted."""
    import psutil

    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True

