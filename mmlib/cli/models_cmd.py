"""`mm pull` (a model from the hub, with progress) and `mm models` (what is cached, and `rm`)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import click

from mmlib.errors import MMError

LIVE_STATES = ("starting", "awake", "asleep", "checkpointed", "waking", "stopping")


def complete_profiles(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of profile names (cheap: file names only)."""
    from click.shell_completion import CompletionItem

    from mmlib.profiles.profile import list_profile_names

    return [CompletionItem(n) for n in list_profile_names() if n.startswith(incomplete)]


def profile_models(target: str) -> list[str]:
    """The models behind a profile (a stack's members' too), or the target itself if it is a model."""
    from mmlib.profiles.profile import list_profile_names, load_profile

    if target not in list_profile_names():
        return [target]
    p = load_profile(target)
    members = [load_profile(m) for m in p.stack] if p.is_stack else [p]
    return [m.model for m in members if m.model]


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def pull_model(model: str, console: Any = None, quiet_if_cached: bool = False) -> Path | None:
    """Pull one model with a progress bar on stderr; the embedded one is converted instead."""
    from mmlib.models import cache, hub
    from mmlib.profiles import embedded

    console = console or _stderr()
    if embedded.is_embedded(model):
        if embedded.is_ready():
            if not quiet_if_cached:
                console.print(f"{model} ships with mm and is ready ({embedded.model_dir()})")
            return embedded.model_dir()
        with console.status(f"preparing {model} (ships with mm; converted once, offline after)"):
            folder = embedded.ensure_converted()
        console.print(f"{model} ships with mm: prepared in {folder}")
        return folder
    if not cache.is_hub_id(model):
        if Path(model).expanduser().exists():
            if not quiet_if_cached:
                console.print(f"{model} is a local folder: nothing to pull")
            return Path(model).expanduser()
        raise MMError(f"'{model}' is neither a profile, a hub id (ORG/NAME) nor a local folder")
    local = cache.complete_snapshot(model)
    if hub.offline():
        return hub.pull(model)  # the cached copy, or a one-line error
    try:
        with console.status(f"asking {hub.endpoint()} about {model}"):
            plan = hub.plan(model)
    except MMError as e:
        if local is None:
            raise
        console.print(f"{model} is in the cache ({local}); not checked for updates: {e}")
        return local
    if not plan.missing:
        if not quiet_if_cached:
            console.print(f"{model} is up to date ({hub.gib(plan.total)} in {hub.hf_hub_cache()})")
        return hub.pull(model, plan_=plan)
    hub.check_disk(plan)
    return _download(model, plan, console)


def _download(model: str, plan: Any, console: Any) -> Path:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from mmlib.models import hub

    done_before = plan.total - plan.to_fetch
    console.print(f"pulling {model}: {len(plan.missing)} of {len(plan.files)} files, {hub.gib(plan.to_fetch)}"
                  + (f" ({hub.gib(done_before)} already here)" if done_before else ""))
    started = time.monotonic()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(model, total=plan.to_fetch)
        folder = hub.pull(model, lambda done, total: bar.update(task, completed=done, total=total), plan_=plan)
    console.print(f"pulled {model} in {time.monotonic() - started:.0f} s -> {folder}")
    return folder


def pull_missing(models: list[str], console: Any = None) -> None:
    """Before a start: pull the hub models that are not whole in the cache yet, so vLLM finds them
    there. Offline (HF_HUB_OFFLINE) nothing is fetched: vLLM gets the same setting."""
    from mmlib.models import cache, hub

    wanted = [m for m in models if m and cache.is_hub_id(m) and cache.complete_snapshot(m) is None]
    if not wanted or hub.offline():
        return
    console = console or _stderr()
    for m in wanted:
        pull_model(m, console)


@click.command("pull")
@click.argument("target", shell_complete=complete_profiles)
def pull(target: str) -> None:
    """Download TARGET (a hub id, or a profile's model) into the Hugging Face cache, with progress.

    Resumes an interrupted download; checks the disk has room first; HF_TOKEN is used for gated
    and private models; HF_HUB_OFFLINE=1 only checks the cache."""
    console = _stderr()
    for model in profile_models(target):
        pull_model(model, console)


# --- mm models ---------------------------------------------------------------------------------------
def _users() -> dict[str, list[str]]:
    """model -> the profiles that serve it."""
    from mmlib.profiles.profile import load_all

    found, _ = load_all()
    out: dict[str, list[str]] = {}
    for p in found:
        if p.model:
            out.setdefault(p.model, []).append(p.name)
    return out


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _ago(t: float) -> str:
    if not t:
        return "-"
    s = max(0, int(time.time() - t))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


@click.group("models", invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List the models on this machine: size, last use, and the profiles that serve them."""
    if ctx.invoked_subcommand:
        return
    from rich.console import Console
    from rich.table import Table

    from mmlib.models import hub
    from mmlib.profiles import embedded

    users = _users()
    rows = [(m.model, m.size, m.complete, m.last_used) for m in hub.cached_models()]
    if embedded.is_ready():
        folder = embedded.model_dir()
        rows.append((embedded.PREFIX + embedded.NAME, _folder_size(folder), True, folder.stat().st_mtime))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    table = Table(title=f"models in {hub.hf_hub_cache()}", title_justify="left")
    for col in ("model", "size", "state", "last used", "profiles"):
        table.add_column(col)
    for model, size, complete, used in rows:
        table.add_row(model, hub.gib(size), "[green]ready[/]" if complete else "[yellow]partial[/] (mm pull resumes)",
                      _ago(used), ", ".join(users.get(model, [])) or "-")
    console.print(table)
    missing = sorted(m for m in users if not any(r[0] == m for r in rows))
    if missing:
        console.print(f"[dim]not on this machine (pulled on first start, or `mm pull`): {', '.join(missing)}[/]")


def _in_use(model: str) -> list[str]:
    from mmlib.serve.client import Client

    client = Client(timeout=2.0)
    if not client.alive():
        return []
    return [f"{s['profile']} ({s['state']})" for s in client.get("/status").get("servers", [])
            if s.get("model") == model and s.get("state") in LIVE_STATES]


@models.command("rm")
@click.argument("model")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def rm(model: str, yes: bool) -> None:
    """Delete MODEL from the cache (refused while a server uses it)."""
    from mmlib.models import hub
    from mmlib.profiles import embedded

    users = _in_use(model)
    if users:
        first = users[0].split(" ")[0]
        raise MMError(f"{model} is in use by {', '.join(users)} (fix: `mm stop {first}` first)")
    if embedded.is_embedded(model):
        folder, size = embedded.model_dir(), _folder_size(embedded.model_dir()) if embedded.is_ready() else 0
        if not embedded.is_ready():
            raise MMError(f"{model} is not prepared on this machine; nothing to remove")
    else:
        found = [m for m in hub.cached_models() if m.model == model]
        if not found:
            raise MMError(f"{model} is not in the cache ({hub.hf_hub_cache()}); `mm models` lists what is")
        folder, size = found[0].path, found[0].size
    if not yes:
        click.confirm(f"delete {model} ({hub.gib(size)} at {folder})?", abort=True, err=True)
    if embedded.is_embedded(model):
        shutil.rmtree(folder)
        freed = size
    else:
        freed = hub.remove(model)
    click.echo(f"removed {model}: {hub.gib(freed)} freed")
