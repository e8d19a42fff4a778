"""The CUDA driver's process checkpoint, by pid, from outside the process: what a process holds on the
GPU goes to host RAM and its GPU memory is released (lock + checkpoint), then comes back (restore +
unlock). It is the driver API behind NVIDIA's cuda-checkpoint utility (cuCheckpointProcess*, in
libcuda since driver r550). mm uses it on a sleeping vLLM's engine process, whose level-1 sleep leaves
0.8-1.8 GiB on the card (its CUDA context, graph pools, allocator workspaces).

Every call blocks (a checkpoint of a 1.4 GiB residue took 0.95 s on an H100): callers run them off the
event loop. The driver is injected (`Driver`), so the scheduler's and the supervisor's handling of
each failure is tested with a fake one; `LibCuda` is the real one (ctypes on libcuda.so.1).
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from mmlib.errors import MMError

MIN_DRIVER_API = 12040  # r550 (CUDA 12.4): the first driver with cuCheckpointProcess* in libcuda
LOCK_TIMEOUT_MS = 10_000  # a process whose CUDA calls do not yield the lock by then is not checkpointed
FUNCTIONS = ("cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
             "cuCheckpointProcessUnlock", "cuCheckpointProcessGetState")


class ProcessState(IntEnum):
    """CUprocessState."""
    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class CheckpointError(MMError):
    pass


class Driver(Protocol):
    """What mm asks of the driver; each call raises CheckpointError on a failure."""

    def api_version(self) -> int: ...
    def state(self, pid: int) -> ProcessState: ...
    def lock(self, pid: int, timeout_ms: int) -> None: ...
    def checkpoint(self, pid: int) -> None: ...
    def restore(self, pid: int) -> None: ...
    def unlock(self, pid: int) -> None: ...


class _LockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


class LibCuda:
    """The real driver: ctypes on libcuda.so.1, initialised once. Raises CheckpointError where there
    is no driver, or one without the checkpoint API."""

    _init_lock = threading.Lock()

    def __init__(self, path: str = "libcuda.so.1"):
        try:
            self._lib = ctypes.CDLL(path)
        except OSError as e:
            raise CheckpointError(f"no CUDA driver ({e})") from None
        missing = [f for f in FUNCTIONS if not hasattr(self._lib, f)]
        if missing:
            raise CheckpointError(f"the CUDA driver has no process checkpoint ({missing[0]} missing; "
                                  f"driver API {self._version()}, {MIN_DRIVER_API} or newer has it)")
        with self._init_lock:
            self._call("cuInit", 0)

    def _version(self) -> int:
        v = ctypes.c_int(0)
        self._lib.cuDriverGetVersion(ctypes.byref(v))
        return v.value

    def _call(self, fn: str, *args) -> None:
        rc = getattr(self._lib, fn)(*args)
        if rc != 0:
            raise CheckpointError(f"{fn} failed: {self._error_name(rc)}")

    def _error_name(self, rc: int) -> str:
        name = ctypes.c_char_p()
        if self._lib.cuGetErrorName(rc, ctypes.byref(name)) == 0 and name.value:
            return f"{name.value.decode()} ({rc})"
        return f"CUresult {rc}"

    def api_version(self) -> int:
        return self._version()

    def state(self, pid: int) -> ProcessState:
        s = ctypes.c_int(-1)
        self._call("cuCheckpointProcessGetState", ctypes.c_int(pid), ctypes.byref(s))
        return ProcessState(s.value) if s.value in ProcessState._value2member_map_ else ProcessState.FAILED

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = _LockArgs(timeoutMs=timeout_ms)
        self._call("cuCheckpointProcessLock", ctypes.c_int(pid), ctypes.byref(args))

    def checkpoint(self, pid: int) -> None:
        self._call("cuCheckpointProcessCheckpoint", ctypes.c_int(pid), None)

    def restore(self, pid: int) -> None:
        self._call("cuCheckpointProcessRestore", ctypes.c_int(pid), None)

    def unlock(self, pid: int) -> None:
        self._call("cuCheckpointProcessUnlock", ctypes.c_int(pid), None)


@dataclass(frozen=True)
class Support:
    ok: bool
    why: str  # one line for `mm doctor` / `mm check`
    api_version: int | None = None


# For mm's fault tests only: a fake driver (tests/faults/fakegpu) keeping its state in this JSON file.
FAKE_ENV = "MM_FAKE_CUDA_CHECKPOINT"
_driver: Driver | None = None


def driver() -> Driver:
    """The real driver, loaded once per process (raises CheckpointError where there is none)."""
    global _driver
    if _driver is None:
        _driver = _fake_driver(os.environ[FAKE_ENV]) if os.environ.get(FAKE_ENV) else LibCuda()
    return _driver


def _fake_driver(state_file: str) -> Driver:
    try:
        from fake_cuda_checkpoint import FileDriver  # only on the fault tests' PYTHONPATH
    except ImportError:
        raise CheckpointError(f"{FAKE_ENV} is set, but its fake driver is not on PYTHONPATH "
                              f"(it is for mm's fault tests: unset {FAKE_ENV})") from None
    return FileDriver(state_file)


def support(drv: Driver | None = None) -> Support:
    """Whether this machine's driver can checkpoint a process, and why not."""
    try:
        d = drv or driver()
    except CheckpointError as e:
        return Support(False, str(e))
    version = d.api_version()
    if version < MIN_DRIVER_API:
        return Support(False, f"driver API {version} has no process checkpoint ({MIN_DRIVER_API} or newer)",
                       version)
    return Support(True, f"CUDA process checkpoint (driver API {version})", version)


def suspend(pids: list[int], drv: Driver, lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> None:
    """Lock every process, then checkpoint each: their GPU memory moves to host RAM and the card is
    freed. On any failure what was done is undone (restored, unlocked) and CheckpointError says why."""
    done: list[int] = []
    try:
        for pid in pids:
            drv.lock(pid, lock_timeout_ms)
            done.append(pid)
        for pid in pids:
            drv.checkpoint(pid)
    except CheckpointError as e:
        try:
            resume(done, drv)
        except CheckpointError as undo:
            raise CheckpointError(f"{e}; undoing it failed too: {undo}") from None
        raise
    return None


def resume(pids: list[int], drv: Driver) -> None:
    """Bring checkpointed (or only locked) processes back to running: restore, then unlock."""
    for pid in pids:
        state = drv.state(pid)
        if state == ProcessState.CHECKPOINTED:
            drv.restore(pid)
            state = ProcessState.LOCKED
        if state == ProcessState.LOCKED:
            drv.unlock(pid)
        elif state != ProcessState.RUNNING:
            raise CheckpointError(f"process {pid} is {state.name.lower()} after its checkpoint; it cannot run again")
