"""Files: written so that a reader never sees half of one (a temp file beside it, fsync, rename),
the last lines of a log read without reading all of it, and old logs kept, a few and bounded."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import BinaryIO


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


def open_private_log(path: Path) -> BinaryIO:
    """A log opened for appending, readable by this user only (0600) whatever the umask or its old mode:
    servers' logs can hold prompts and paths."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def tail_lines(path: Path | None, lines: int = 15, max_bytes: int = 64 * 1024) -> list[str]:
    """The last non-blank lines of a file (from its last max_bytes); [] when it does not exist."""
    if not path or not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
        text = f.read().decode(errors="replace")
    return [line for line in text.splitlines() if line.strip()][-lines:]


def rotate(path: Path, keep: int, max_bytes: int) -> None:
    """Move `path` to path.1 (path.1 to path.2, ... the oldest of `keep` dropped). The old logs
    together hold at most max_bytes: the oldest go first, and a last log bigger than that alone
    keeps its end (where a failure shows)."""
    olds = [path.with_name(f"{path.name}.{i}") for i in range(1, keep + 1)]
    olds[-1].unlink(missing_ok=True)
    for newer, older in zip(reversed(olds[:-1]), reversed(olds[1:])):
        if newer.exists():
            os.replace(newer, older)
    os.replace(path, olds[0])
    if olds[0].stat().st_size > max_bytes:
        _keep_end(olds[0], max_bytes)
    total = 0
    for i, old in enumerate(olds):
        total += old.stat().st_size if old.exists() else 0
        if total > max_bytes:  # this one and every older one go
            for gone in olds[i:]:
                gone.unlink(missing_ok=True)
            return


def _keep_end(path: Path, max_bytes: int) -> None:
    with open(path, "rb") as f:
        f.seek(-max_bytes, os.SEEK_END)
        end = f.read()
    with open(path, "wb") as f:
        f.write(end)
