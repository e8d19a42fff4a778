"""Server records: one small JSON file per running server (pid, its start time, where it listens),
so that a restarted daemon adopts what the last one started and `mm status` can say what still runs
when no daemon does. Files are 0600 in the 0700 state folder, written atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmlib import paths
from mmlib.system.files import replace_atomic


def folder() -> Path:
    d = paths.state_dir() / "servers"
    d.mkdir(exist_ok=True, mode=0o700)
    return d


def path(name: str) -> Path:
    return folder() / f"{name}.json"


def write(name: str, record: dict[str, Any]) -> None:
    replace_atomic(path(name), json.dumps(record), mode=0o600)


def remove(name: str) -> None:
    path(name).unlink(missing_ok=True)


def read_all() -> list[tuple[Path, dict[str, Any] | None]]:
    """Every record, None for a file that cannot be read as one."""
    d = paths.state_dir() / "servers"
    out = []
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            record = json.loads(f.read_text())
            out.append((f, record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None))
        except (OSError, ValueError):
            out.append((f, None))
    return out


def still_running(record: dict[str, Any]) -> bool:
    from mmlib.system import proctree  # psutil: not on `mm status`'s path unless a record exists

    return proctree.same_process(record["pid"], record.get("create_time"))


def stop_recorded(file: Path, record: dict[str, Any] | None) -> None:
    """Kill the process group a record names, if that process is still the one recorded; drop the file."""
    if record is not None:
        from mmlib.system import proctree

        proctree.kill_recorded(record["pid"], record.get("create_time"))
    file.unlink(missing_ok=True)
