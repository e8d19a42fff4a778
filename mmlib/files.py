"""Writing files so that a reader never sees half of one: a temp file beside it, fsync, rename."""
from __future__ import annotations

import os
import time
from pathlib import Path


def write_tmp(directory: Path, stem: str, text: str, mode: int = 0o644) -> Path:
    """A fully written, fsynced temp file in `directory` (same filesystem, so a rename is atomic)."""
    tmp = directory / f".{stem}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def replace_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(write_tmp(path.parent, path.name, text, mode), path)
