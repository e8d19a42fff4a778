"""Commands that start, switch, sleep and stop servers, and show them."""
from __future__ import annotations

import json
import os
import sys
import time

import click

from mmlib.errors import MMError
from mmlib.serve.client import Client


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def own_ports() -> frozenset[int]:
    """Ports of the servers mm runs now (a running profile's own port is not "in use")."""
    client = Client(timeout=2.0)
    try:
        if client.alive():
            return frozenset(s["port"] for s in client.get("/status").get("servers", []) if s.get("port"))
    except MMError:
        pass
    return frozenset()


def preflight(profile: str, force: bool, model: str | None = None) -> None:
    """Guard rails before anything starts (`--force` skips them), on the model that will be served."""
    if force:
        return
    from mmlib.guard import checks

    checks.preflight(profile, own_ports(), model=model)


def activate(profile: str | None, model: str | None = None, force: bool = False, verb: str = "starting",
             quiet: bool = False) -> dict:
    """Ask the daemon to make a profile answer, with a spinner while it loads."""
    from rich.console import Console

    from mmlib.profiles.config import load_config

    preflight(profile or load_config().default_profile, force, model)
    client = Client().ensure_daemon()
    console = Console(stderr=True)
    what = (profile or "default") + (f" ({model})" if model else "")
    with console.status(f"{verb} {what}: the first start of a model can take minutes"):
        result = client.post("/up", {"profile": profile, "model": model}, timeout=None)
    proxy = result["proxy"]
    for s in result["servers"]:
        click.echo(f"{s['profile']}: {s['state']}, model '{s['served_model_name']}' at {proxy}/v1 "
                   f"(server {s['url']}, pid {s['pid']}); ready in {result['switch_s']:.2f} s", err=quiet)
    return result


FORCE = click.option("--force", is_flag=True, help="Skip the checks that run before a start.")


@click.command("up")
@click.argument("profile", required=False)
@click.option("--model", help="Serve this model (hub id or path) instead of the profile's.")
@FORCE
def up(profile: str | None, model: str | None, force: bool) -> None:
    """Start (or wake) PROFILE's server(s) and wait until they answer."""
    activate(profile, model, force)


@click.command("switch")
@click.argument("profile")
@FORCE
def switch(profile: str, force: bool) -> None:
    """Make PROFILE the awake one: others sleep (or stop, where sleep mode is unavailable)."""
    activate(profile, force=force, verb="switching to")


def _stack_command(name: str, doc: str) -> click.Command:
    @click.command(name, help=doc)
    @FORCE
    def command(force: bool) -> None:
        activate(name, force=force, verb="switching to")
    return command


@click.command("perf")
@click.argument("model", required=False)
@FORCE
def perf(model: str | None, force: bool) -> None:
    """Serve the perf profile (tuned to the limit of a 12 GB card), optionally with another MODEL."""
    activate("perf", model, force)


@click.command("sleep")
@click.argument("profile", required=False)
def sleep(profile: str | None) -> None:
    """Put PROFILE (or every awake server) to sleep; servers without sleep mode are stopped."""
    client = Client()
    if not client.alive():
        raise MMError("nothing is running (the daemon is not started)")
    doc = client.post("/sleep", {"profile": profile}, timeout=None)
    for s in doc["servers"]:
        if profile in (None, s["profile"]):
            note = "" if s["sleep_mode"] else " (no sleep mode here: stopped instead)"
            click.echo(f"{s['profile']}: {s['state']}{note}")


@click.command("wake")
@click.argument("profile")
@FORCE
def wake(profile: str, force: bool) -> None:
    """Wake PROFILE (starting it if needed); others sleep if it does not fit beside them."""
    activate(profile, force=force, verb="waking")


@click.command("stop")
@click.argument("profile", required=False)
@click.option("--all", "all_", is_flag=True, help="Stop every server.")
def stop(profile: str | None, all_: bool) -> None:
    """Stop PROFILE's server (SIGTERM to its process group, SIGKILL after a grace period)."""
    if not profile and not all_:
        raise MMError("say which: `mm stop PROFILE` or `mm stop --all`")
    client = Client()
    if not client.alive():
        if not leftover_servers():
            click.echo("nothing is running")
            return
        client.ensure_daemon()  # it adopts what the last daemon left, so that it can stop them
    result = client.post("/stop", {"profile": profile, "all": all_}, timeout=None)
    click.echo(f"stopped: {', '.join(result['stopped']) or 'nothing'}")


STATE_STYLE = {"awake": "green", "asleep": "cyan", "starting": "yellow", "waking": "yellow", "falling asleep": "yellow",
               "stopping": "yellow", "failed": "red", "stopped": "dim"}


def memory_cells(mem: dict) -> tuple[str, str]:
    gpu = f"{mem['gpu_mib'] / 1024:.1f} GiB" if mem.get("gpu_mib") is not None else (mem.get("gpu") or "-")
    ram = f"{mem['rss_mib'] / 1024:.1f} GiB" if mem.get("rss_mib") is not None else "-"
    return gpu, ram


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Show every server: profile, model, state, URL, pid, uptime, switch mode and time."""
    client = Client()
    if not client.alive():
        left = leftover_servers()
        if as_json:
            click.echo(json.dumps({"daemon": None, "servers": [], "left_running": left}))
        elif left:
            click.echo(f"mm daemon is not running, but {len(left)} server(s) it started still run:")
            for r in left:
                click.echo(f"  {r['profile']}: pid {r['pid']}, {r.get('uds') and 'unix:' + r['uds'] or r.get('port')}")
            click.echo("the next mm command starts a daemon that adopts them (`mm stop --all` stops them)")
        else:
            click.echo("mm daemon is not running; no servers (any mm command that needs one starts it)")
        return
    doc = client.get("/status")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mm: proxy {doc['daemon']['proxy']}/v1", title_justify="left")
    for col in ("profile", "model", "state", "URL", "pid", "uptime", "GPU", "RAM", "queue", "switch", "last switch"):
        table.add_column(col)
    for s in doc["servers"]:
        state = f"[{STATE_STYLE.get(s['state'], '')}]{s['state']}[/]"
        last = f"{s['last_switch_s']:.2f}s" if s.get("last_switch_s") is not None else "-"
        table.add_row(s["profile"], s["served_model_name"], state, s["url"] or "-", str(s["pid"] or "-"),
                      human_duration(s["uptime_s"]), *memory_cells(s.get("memory") or {}),
                      f"{s.get('in_flight', 0)} / {s.get('waiting', 0)}", s["switch"], last)
    console = Console()
    if not console.is_terminal:  # piped: don't squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)
    card = doc.get("card") or {}
    room = f"; card: {card['free'] / 2**30:.1f} GiB free of {card['capacity'] / 2**30:.1f} GiB" + \
        (" (budget)" if card.get("budget") else "") if card.get("capacity") else ""
    console.print(f"queue: in flight / waiting; switches in the last minute: {doc.get('switches_per_min', 0)}{room}",
                  highlight=False)
    for s in doc["servers"]:
        if s["state"] == "failed" and s.get("error"):
            console.print(f"[red]{s['profile']}[/]: {s['error']} (log: {s['log']})")
            for line in s.get("error_log", [])[-5:]:
                console.print(f"  | {line}", markup=False, highlight=False)


def leftover_servers() -> list[dict]:
    """Servers a daemon that is gone (killed, say) left running, from their records."""
    from mmlib.serve import records

    return [r for _, r in records.read_all() if r is not None and records.still_running(r)]


@click.command("logs")
@click.argument("profile")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=40, show_default=True, help="How many lines from the end.")
def logs(profile: str, follow: bool, lines: int) -> None:
    """Print PROFILE's server log (`daemon` for the daemon's own)."""
    from mmlib import paths
    from mmlib.profiles.profile import NAME_RE

    if not NAME_RE.match(profile):
        raise MMError(f"'{profile}' is not a profile name")
    path = paths.logs_dir() / f"{profile}.log"
    if not path.exists():
        raise MMError(f"no log for {profile} yet ({path}); it is written when the server first starts")
    with open(path, "rb") as f:
        data = f.read()
        for line in data.decode(errors="replace").splitlines()[-lines:]:
            click.echo(line)
        while follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.2)
                if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:  # the server was restarted
                    f.close()
                    f = open(path, "rb")


voice = _stack_command("voice", "Bring the voice stack (speech-to-text + LLM) awake.")
ocr = _stack_command("ocr", "Bring the OCR stack (LightOnOCR) awake.")
