"""The one process-tree wrapper (psutil): a server's family (its root and every descendant, vLLM's
engine processes included), whether they died, what RAM they hold (RSS, or their PSS share), and stopping a process group
politely, then firmly."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil


def family(pid: int | None) -> list[psutil.Process]:
    """The process and all its descendants; [] when it is gone."""
    if not pid:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def is_dead(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def all_dead(procs: list[psutil.Process]) -> bool:
    return all(is_dead(p) for p in procs)


def rss_bytes(procs: list[psutil.Process]) -> int | None:
    total, seen = 0, False
    for p in procs:
        try:
            total += p.memory_info().rss
            seen = True
        except psutil.Error:
            continue
    return total if seen else None


def pss_bytes(procs: list[psutil.Process]) -> int | None:
    """Their share of RAM (PSS: each shared page divided among the processes that map it), so that
    the CUDA and torch libraries every vLLM process maps count once across servers, not once per
    process as RSS counts them. A process whose smaps cannot be read counts its RSS."""
    total, seen = 0, False
    for p in procs:
        try:
            try:
                total += p.memory_full_info().pss
            except psutil.AccessDenied:
                total += p.memory_info().rss
            seen = True
        except psutil.Error:
            continue
    return total if seen else None


def create_time(pid: int | None) -> float | None:
    try:
        return psutil.Process(pid).create_time() if pid else None
    except psutil.Error:
        return None


def same_process(pid: int, created: float | None) -> bool:
    """Whether pid is still the process that was recorded, and alive (a reused pid is someone else;
    a zombie waits only to be reaped)."""
    now = create_time(pid)
    if now is None or (created is not None and abs(now - created) >= 1):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def signal_group(pgid: int | None, procs: list[psutil.Process], sig: int) -> None:
    """The whole process group, and any member that left it."""
    if pgid:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


async def terminate(pgid: int | None, procs: list[psutil.Process], grace_s: float, kill_wait_s: float = 5.0,
                    poll_s: float = 0.05) -> bool:
    """SIGTERM the group, SIGKILL what is left after grace_s; True once every process is gone."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        signal_group(pgid, procs, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not all_dead(procs):
            await asyncio.sleep(poll_s)
        if all_dead(procs):
            return True
    return all_dead(procs)


def kill_recorded(pid: int, created: float | None) -> None:
    """SIGKILL the process group a record names, if that process is still the one recorded."""
    if same_process(pid, created):
        signal_group(pid, family(pid), signal.SIGKILL)
