"""Commands that start, switch, sleep and stop servers, and show them."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import click

from mmlib.cli.models_cmd import complete_profiles
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


def own_servers() -> tuple[frozenset[int], frozenset[int]]:
    """The ports and the processes of the servers mm runs now: a running profile's own port is not
    "in use", and the GPU memory they hold is room mm makes itself."""
    from mmlib.system import proctree

    client = Client(timeout=2.0)
    try:
        servers = client.get("/status").get("servers", []) if client.alive() else []
    except MMError:
        servers = []
    return (frozenset(s["port"] for s in servers if s.get("port")),
            frozenset(p.pid for s in servers for p in proctree.family(s.get("pid"))))


def preflight(profile: str, force: bool, model: str | None = None) -> None:
    """Guard rails before anything starts (`--force` skips them), on the model that will be served."""
    if force:
        return
    from mmlib.guard import preflight as guard

    ports, pids = own_servers()
    guard.check_named(profile, ports, model=model, mm_pids=pids)


def activate(profile: str | None, model: str | None = None, force: bool = False, verb: str = "starting",
             quiet: bool = False) -> dict:
    """Ask the daemon to make a profile answer: pull its hub models first (with progress), then
    show what the server is doing (its start phase) until it answers."""
    from rich.console import Console

    from mmlib import paths
    from mmlib.cli.models_cmd import profile_models, pull_missing
    from mmlib.profiles import embedded

    name = profile or default_profile()
    models = [model] if model else profile_models(name)
    with embedded.converting_meanwhile(models, paths.logs_dir() / "embedded-convert.log"):
        preflight(name, force, model)
        console = Console(stderr=True)
        pull_missing(models, console)
        client = Client().ensure_daemon()
        what = (profile or "default") + (f" ({model})" if model else "")
        poller = Client(timeout=2.0, sock=client.sock)
        result = wait_for_up(lambda: client.post("/up", {"profile": profile, "model": model, "force": force},
                                                         timeout=None),
                             lambda: poller.get("/status"), f"{verb} {what}", console)
    proxy = result["proxy"]
    for s in result["servers"]:
        click.echo(f"{s['profile']}: {s['state']}, model '{s['served_model_name']}' at {proxy}/v1 "
                   f"(server {s['url']}, pid {s['pid']}); ready in {result['switch_s']:.2f} s", err=quiet)
    return result


def default_profile() -> str:
    from mmlib.profiles.config import load_config

    return load_config().default_profile


# --- waiting for a start, showing its phase --------------------------------------------------------
FALLBACK_TEXT = "the first start of a model can take minutes"


def starting_phase(doc: dict) -> dict | None:
    """The phase of a server that is starting or waking ({"name", "detail", "percent", "since"}),
    where the daemon reports one."""
    for s in doc.get("servers", []):
        if s.get("state") in ("starting", "waking") and isinstance(s.get("phase"), dict):
            return {**s["phase"], "profile": s.get("profile")}
    return None


def phase_text(phase: dict | None) -> str:
    if not phase:
        return FALLBACK_TEXT
    text = str(phase.get("name") or "starting")
    if phase.get("percent") is not None:
        text += f" {float(phase['percent']):.0f}%"
    if phase.get("detail"):
        text += f" ({phase['detail']})"
    return text


def phase_line(action: str, phase: dict | None, elapsed: float):
    """spinner, what, phase (and its detail), a bar where vLLM prints a percentage, elapsed time."""
    from rich.progress_bar import ProgressBar
    from rich.spinner import Spinner
    from rich.table import Table

    grid = Table.grid(padding=(0, 1))
    grid.add_row(Spinner("dots", style="cyan"), f"{action}: {phase_text(phase)}",
                 ProgressBar(total=100, completed=float(phase["percent"]), width=24)
                 if phase and phase.get("percent") is not None else "",
                 f"[dim]{human_duration(elapsed)}[/]")
    return grid


def wait_for_up(up: Callable[[], dict], status: Callable[[], dict], action: str, console,
                poll_s: float = 0.5) -> dict:
    """Run `up` (the daemon's /up returns once the server answers) while `status` is polled for the
    start phase, drawn as one live line."""
    import threading

    from rich.live import Live

    outcome: dict = {}

    def call() -> None:
        try:
            outcome["result"] = up()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    started = time.monotonic()
    phase = None
    with Live(phase_line(action, None, 0), console=console, transient=True, refresh_per_second=8) as live:
        while worker.is_alive():
            worker.join(poll_s)
            try:
                phase = starting_phase(status())
            except MMError:
                pass  # the daemon is busy; keep the last phase shown
            live.update(phase_line(action, phase, time.monotonic() - started))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


FORCE = click.option("--force", is_flag=True, help="Skip the checks that run before a start.")


@click.command("up")
@click.argument("profile", required=False, shell_complete=complete_profiles)
@click.option("--model", help="Serve this model (hub id or path) instead of the profile's.")
@FORCE
def up(profile: str | None, model: str | None, force: bool) -> None:
    """Start (or wake) PROFILE's server(s) and wait until they answer."""
    activate(profile, model, force)


@click.command("switch")
@click.argument("profile", shell_complete=complete_profiles)
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
@click.argument("profile", required=False, shell_complete=complete_profiles)
@click.option("--checkpoint", is_flag=True, help="Also move what it still holds on the GPU to RAM (the CUDA "
              "driver's process checkpoint): the card is all free, the next wake restores it.")
def sleep(profile: str | None, checkpoint: bool) -> None:
    """Put PROFILE (or every awake server) to sleep; servers without sleep mode are stopped."""
    if checkpoint and not profile:
        raise MMError("--checkpoint needs a profile: `mm sleep PROFILE --checkpoint`")
    client = Client()
    if not client.alive():
        raise MMError("nothing is running (the daemon is not started)")
    doc = client.post("/sleep", {"profile": profile, **({"checkpoint": True} if checkpoint else {})}, timeout=None)
    for s in doc["servers"]:
        if profile in (None, s["profile"]):
            note = "" if s["sleep_mode"] else " (no sleep mode here: stopped instead)"
            click.echo(f"{s['profile']}: {s['state']}{note}")


@click.command("wake")
@click.argument("profile", shell_complete=complete_profiles)
@FORCE
def wake(profile: str, force: bool) -> None:
    """Wake PROFILE (starting it if needed); others sleep if it does not fit beside them."""
    activate(profile, force=force, verb="waking")


@click.command("stop")
@click.argument("profile", required=False, shell_complete=complete_profiles)
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


STATE_STYLE = {"awake": "green", "asleep": "cyan", "checkpointed": "blue", "starting": "yellow", "waking": "yellow", "falling asleep": "yellow",
               "stopping": "yellow", "failed": "red", "stopped": "dim"}


def state_cell(s: dict) -> str:
    """The state, and for a starting server what it is doing (its phase, where the daemon says)."""
    cell = f"[{STATE_STYLE.get(s['state'], '')}]{s['state']}[/]"
    if s["state"] in ("starting", "waking") and isinstance(s.get("phase"), dict):
        cell += f": {phase_text(s['phase'])}"
    return cell


def memory_cells(mem: dict, cards: list | None = None) -> tuple[str, str]:
    """GPU and RAM cells; `cards`: the cards it runs on, named where the machine has several."""
    gpu = f"{mem['gpu_mib'] / 1024:.1f} GiB" if mem.get("gpu_mib") is not None else (mem.get("gpu") or "-")
    if cards:
        gpu += f" (card{'s' if len(cards) > 1 else ''} {','.join(map(str, cards))})"
    ram_mib = mem["ram_mib"] if mem.get("ram_mib") is not None else mem.get("rss_mib")
    ram = f"{ram_mib / 1024:.1f} GiB" if ram_mib is not None else "-"
    return gpu, ram


def card_lines(cards: list[dict]) -> list[str]:
    """One line per card of a machine of several: its memory and the servers on it."""
    lines = []
    for c in cards:
        on = ", ".join(s["profile"] + (f" {s['gpu_mib'] / 1024:.1f} GiB" if s.get("gpu_mib") is not None else "")
                       for s in c.get("servers") or []) or "no server"
        budget = f" (mm may use {c['capacity'] / 2**30:.1f})" if c.get("capacity", c["total"]) < c["total"] else ""
        lines.append(f"card {c['index']} ({c['name']}): {c['free'] / 2**30:.1f} GiB free of "
                     f"{c['total'] / 2**30:.1f} GiB{budget}; {on}")
    return lines


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
    several = len(doc.get("cards") or []) > 1
    for s in doc["servers"]:
        last = f"{s['last_switch_s']:.2f}s" if s.get("last_switch_s") is not None else "-"
        cards = s.get("gpus") if several and s.get("pid") else None
        table.add_row(s["profile"], s["served_model_name"], state_cell(s), s["url"] or "-", str(s["pid"] or "-"),
                      human_duration(s["uptime_s"]), *memory_cells(s.get("memory") or {}, cards),
                      f"{s.get('in_flight', 0)} / {s.get('waiting', 0)}", s["switch"], last)
    console = Console()
    if not console.is_terminal:  # piped: don't squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)
    card = doc.get("card") or {}
    room = f"; card: {card['free'] / 2**30:.1f} GiB free of {card['capacity'] / 2**30:.1f} GiB" + \
        (" (budget)" if card.get("budget") else "") if card.get("capacity") and not several else ""
    console.print(f"queue: in flight (paused while asleep) / waiting; switches in the last minute: {doc.get('switches_per_min', 0)}{room}",
                  highlight=False)
    for line in card_lines(doc["cards"]) if several else []:
        console.print(line, highlight=False, markup=False)
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
@click.argument("profile", shell_complete=complete_profiles)
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
