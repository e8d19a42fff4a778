"""The checkpoint wrapper's sequencing against a fake driver: what it calls, in which order, and
that a failure half-way leaves every process running again."""
from __future__ import annotations

import pytest

from mmlib.system.cuda_checkpoint import CheckpointError, ProcessState, resume, support, suspend


class FakeDriver:
    def __init__(self, version: int = 13000, fail: str | None = None):
        self.version, self.fail = version, fail
        self.states: dict[int, ProcessState] = {}
        self.calls: list[str] = []

    def api_version(self) -> int:
        return self.version

    def state(self, pid: int) -> ProcessState:
        return self.states.get(pid, ProcessState.RUNNING)

    def _step(self, what: str, pid: int, need: ProcessState, to: ProcessState) -> None:
        self.calls.append(f"{what} {pid}")
        if self.fail == f"{what} {pid}":
            raise CheckpointError(f"cuCheckpointProcess{what.title()} failed: CUDA_ERROR_TIMEOUT (909)")
        assert self.state(pid) == need, f"{what} {pid} in state {self.state(pid)}"
        self.states[pid] = to

    def lock(self, pid, timeout_ms):
        self._step("lock", pid, ProcessState.RUNNING, ProcessState.LOCKED)

    def checkpoint(self, pid):
        self._step("checkpoint", pid, ProcessState.LOCKED, ProcessState.CHECKPOINTED)

    def restore(self, pid):
        self._step("restore", pid, ProcessState.CHECKPOINTED, ProcessState.LOCKED)

    def unlock(self, pid):
        self._step("unlock", pid, ProcessState.LOCKED, ProcessState.RUNNING)


def test_suspend_locks_every_process_before_checkpointing_and_resume_undoes_it():
    d = FakeDriver()
    suspend([11, 12], d)
    assert d.calls == ["lock 11", "lock 12", "checkpoint 11", "checkpoint 12"]
    assert set(d.states.values()) == {ProcessState.CHECKPOINTED}
    resume([11, 12], d)
    assert d.calls[4:] == ["restore 11", "unlock 11", "restore 12", "unlock 12"]
    assert set(d.states.values()) == {ProcessState.RUNNING}


@pytest.mark.parametrize("fail", ["lock 12", "checkpoint 12"])
def test_a_failed_suspend_leaves_every_process_running(fail):
    d = FakeDriver(fail=fail)
    with pytest.raises(CheckpointError, match="TIMEOUT"):
        suspend([11, 12], d)
    assert all(s == ProcessState.RUNNING for s in d.states.values())


def test_resume_of_a_failed_process_says_it_cannot_run():
    d = FakeDriver()
    d.states[7] = ProcessState.FAILED
    with pytest.raises(CheckpointError, match="process 7 is failed"):
        resume([7], d)


def test_support_names_the_driver_api():
    assert support(FakeDriver(13000)).ok
    old = support(FakeDriver(12020))
    assert not old.ok and "12020" in old.why
