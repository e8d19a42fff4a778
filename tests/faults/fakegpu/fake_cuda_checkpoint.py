"""A fake CUDA driver's process checkpoint (mmlib.system.cuda_checkpoint.Driver), which mm's daemon
loads where MM_FAKE_CUDA_CHECKPOINT names its state file. It keeps each process's state, records
every call, and fails the next call named in "fail" (the test sets it) as the real driver would:
a CheckpointError naming the call and a CUresult."""
from __future__ import annotations

from pathlib import Path

import fake_gpu_state as gpu

from mmlib.system.cuda_checkpoint import CheckpointError, ProcessState


class FileDriver:
    def __init__(self, path: str):
        self.path = Path(path)

    def _doc(self) -> dict:
        doc = gpu.read_driver(self.path)
        doc.setdefault("states", {})
        doc.setdefault("calls", [])
        return doc

    def api_version(self) -> int:
        return int(self._doc().get("api_version", 13000))

    def state(self, pid: int) -> ProcessState:
        if not gpu.alive(pid):
            raise CheckpointError(f"cuCheckpointProcessGetState failed: CUDA_ERROR_NOT_FOUND (500) for {pid}")
        return ProcessState[self._doc()["states"].get(str(pid), "RUNNING")]

    def _step(self, what: str, pid: int, need: str, to: str) -> None:
        with gpu.driver_locked(self.path):
            self._step_locked(what, pid, need, to)

    def _step_locked(self, what: str, pid: int, need: str, to: str) -> None:
        doc = self._doc()
        doc["calls"].append(f"{what} {pid}")
        if doc.get("fail") == what:
            doc["fail"] = None
            gpu.write_driver(doc, self.path)
            raise CheckpointError(f"cuCheckpointProcess{what.title()} failed: CUDA_ERROR_UNKNOWN (999)")
        have = doc["states"].get(str(pid), "RUNNING")
        if have != need or not gpu.alive(pid):
            gpu.write_driver(doc, self.path)
            raise CheckpointError(f"cuCheckpointProcess{what.title()} failed: CUDA_ERROR_ILLEGAL_STATE (401)")
        doc["states"][str(pid)] = to
        gpu.write_driver(doc, self.path)

    def lock(self, pid: int, timeout_ms: int) -> None:
        self._step("lock", pid, "RUNNING", "LOCKED")

    def checkpoint(self, pid: int) -> None:
        self._step("checkpoint", pid, "LOCKED", "CHECKPOINTED")

    def restore(self, pid: int) -> None:
        self._step("restore", pid, "CHECKPOINTED", "LOCKED")

    def unlock(self, pid: int) -> None:
        self._step("unlock", pid, "LOCKED", "RUNNING")
