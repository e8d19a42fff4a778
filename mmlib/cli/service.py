"""`mm service install|remove`: start mm's daemon at login (a systemd user unit), and
`mm completion bash|zsh|fish`: the shell completion script (click's)."""
from __future__ import annotations

import shlex

import click


@click.group("service")
def service() -> None:
    """Start the mm daemon at login (systemd user unit), so clients find the endpoint up."""


@service.command("install")
@click.option("--no-start", is_flag=True, help="Write the unit only; do not enable or start it.")
def install(no_start: bool) -> None:
    """Write ~/.config/systemd/user/mm.service and enable it (`systemctl --user enable --now`)."""
    from mmlib import paths
    from mmlib.system import systemd

    env_file = paths.config_dir() / "daemon.env"
    path = systemd.write_unit(systemd.render_unit(systemd.default_python(), paths.PROJECT_ROOT,
                                                  systemd.passed_env(), env_file))
    click.echo(f"wrote {path}")
    click.echo(f"secrets for the daemon (HF_TOKEN=..., MM_API_KEY=...) go in {env_file} (optional)")
    commands = systemd.install_commands()
    if no_start:
        _tell("to start it", commands)
        return
    problem = systemd.run_commands(commands)
    if problem:
        click.echo(f"mm: could not enable it here ({problem})", err=True)
        _tell("run these where a systemd user session is available", commands)
        return
    click.echo("enabled and started: the daemon now starts at login (`mm doctor` shows it); "
               "`loginctl enable-linger` starts it at boot without a login")


@service.command("remove")
def remove() -> None:
    """Stop and disable the unit, and delete it."""
    from mmlib.system import systemd

    path = systemd.unit_path()
    if not path.is_file():
        click.echo(f"no unit at {path}: nothing to remove")
        return
    problem = systemd.run_commands(systemd.remove_commands()[:1])
    path.unlink()
    problem = problem or systemd.run_commands(systemd.remove_commands()[1:])
    click.echo(f"removed {path}")
    if problem:
        click.echo(f"mm: systemctl did not answer ({problem}); if the unit was running: "
                   f"{' && '.join(shlex.join(c) for c in systemd.remove_commands())}", err=True)


def _tell(why: str, commands: list[list[str]]) -> None:
    click.echo(f"{why}: " + " && ".join(shlex.join(c) for c in commands))


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for SHELL, e.g. `eval "$(mm completion bash)"` in ~/.bashrc,
    `mm completion fish > ~/.config/fish/completions/mm.fish`."""
    from click.shell_completion import get_completion_class

    from mmlib.cli import main

    cls = get_completion_class(shell)
    click.echo(cls(main, {}, "mm", "_MM_COMPLETE").source())
