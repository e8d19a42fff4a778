"""The state the fake cards, the fake driver and the fake vLLM share: files, so that the daemon, the
servers and the test see the same cards. `$FAKE_GPU_COUNT` cards (default 1) of 80 GiB each;
`$FAKE_GPU_DIR/<pid>` holds the bytes a process holds on each card ({"0": bytes, "1": ...});
`$MM_FAKE_CUDA_CHECKPOINT` is the driver's JSON: {"states": {pid: "CHECKPOINTED"...}, "calls": [...],
"fail": "restore" (the next such call fails), "api_version": 13000}."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from pathlib import Path

MIB = 1 << 20
TOTAL = 80 * 1024 * MIB  # an H100's 80 GiB


def gpu_dir() -> Path | None:
    return Path(os.environ["FAKE_GPU_DIR"]) if os.environ.get("FAKE_GPU_DIR") else None


def driver_file() -> Path | None:
    return Path(os.environ["MM_FAKE_CUDA_CHECKPOINT"]) if os.environ.get("MM_FAKE_CUDA_CHECKPOINT") else None


def read_driver(path: Path | None = None) -> dict:
    path = path or driver_file()
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def driver_locked(path: Path | None = None):
    """One read-modify-write of the driver's file at a time: mm checkpoints several sleepers at once,
    each from a thread of its own (the real driver keeps its state per process)."""
    path = path or driver_file()
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_driver(doc: dict, path: Path | None = None) -> None:
    path = path or driver_file()
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def driver_state(pid: int) -> str:
    return read_driver().get("states", {}).get(str(pid), "RUNNING")


def count() -> int:
    return int(os.environ.get("FAKE_GPU_COUNT") or 1)


def hold(pid: int, nbytes: int, cards: tuple[int, ...] = (0,)) -> None:
    """What a process holds on each of these fake cards now."""
    d = gpu_dir()
    if d is not None:
        tmp = d / f".{pid}.tmp"
        tmp.write_text(json.dumps({str(c): nbytes for c in cards}))
        os.replace(tmp, d / str(pid))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def processes(card: int = 0) -> dict[int, int]:
    """pid -> bytes of every live process on the card; a checkpointed one has left it."""
    d, states = gpu_dir(), read_driver().get("states", {})
    out = {}
    for f in d.iterdir() if d and d.is_dir() else []:
        if f.name.isdigit() and alive(int(f.name)) and states.get(f.name, "RUNNING") != "CHECKPOINTED":
            try:
                held = json.loads(f.read_text() or "{}").get(str(card))
            except (OSError, ValueError):
                continue
            if held is not None:
                out[int(f.name)] = int(held)
    return out
