"""mm's command line. Thin: each command module parses, calls into mmlib, prints.

Kept light on purpose (`mm status` must answer in well under 0.3 s): nothing here imports vllm,
torch or transformers, and rich is imported only by the commands that draw with it.
"""
from __future__ import annotations

import importlib
import sys

import click

from mmlib.errors import MMError

# command -> "module:function" under mmlib.cli. Loaded on use (click's lazy-group pattern), so
# `mm status` pays for no import that only `mm bench` needs.
COMMANDS = {
    "up": "servers:up", "stop": "servers:stop", "status": "servers:status", "logs": "servers:logs",
    "switch": "servers:switch", "sleep": "servers:sleep", "wake": "servers:wake", "perf": "servers:perf",
    "voice": "servers:voice", "ocr": "servers:ocr", "chat": "chat:chat", "profiles": "profiles_cmd:profiles",
    "check": "check:check", "doctor": "check:doctor", "bench": "bench:bench", "compare": "bench:compare",
    "eval": "evals:eval_cmd", "daemon": "daemon_cmd:daemon", "pull": "models_cmd:pull", "models": "models_cmd:models",
    "service": "service:service", "completion": "service:completion", "batch": "batch:batch",
}


class Main(click.Group):
    """Lazy subcommands; prints MMError (and a Ctrl-C) as one line, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"mmlib.cli.{module}"), attr)

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
