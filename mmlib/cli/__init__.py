"""mm's command line. Thin: each command module parses, calls into mmlib, prints.

Kept light on purpose (`mm status` must answer in well under 0.3 s): nothing here imports vllm,
torch or transformers, and rich is imported only by the commands that draw with it.
"""
from __future__ import annotations

import sys

import click

from mmlib.errors import MMError


class Main(click.Group):
    """Prints MMError (and a Ctrl-C) as one line, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MMError as e:
            click.echo(f"mm: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("mm: interrupted", err=True)
            sys.exit(130)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mm", prog_name="mm")
def main() -> None:
    """mm: run local LLMs with vLLM, tuned for one GPU, behind one stable OpenAI endpoint."""


def _register() -> None:
    from mmlib.cli import bench, chat, check, daemon_cmd, evals, profiles_cmd, servers

    for module in (servers, profiles_cmd, chat, check, bench, evals, daemon_cmd):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
