"""The life of a vLLM server as one closed set of states and one table of allowed transitions.

Only ManagedServer._set_state changes a state, and it checks this table (llama-swap's swapState idea),
so an impossible sequence (waking a stopped server, say) fails loudly instead of corrupting things.
"""
from __future__ import annotations

from enum import Enum


class State(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "awake"
    SLEEPING = "asleep"
    WAKING = "waking"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.READY}),  # READY: adopted from a previous daemon
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    State.READY: frozenset({State.SLEEPING, State.STOPPING, State.FAILED}),
    State.SLEEPING: frozenset({State.WAKING, State.STOPPING, State.FAILED}),
    State.WAKING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING, State.STOPPED}),
}

# States in which a process exists and holds (or may hold) GPU memory.
LIVE = frozenset({State.STARTING, State.READY, State.SLEEPING, State.WAKING, State.STOPPING})


class TransitionError(RuntimeError):
    pass


def check_transition(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise TransitionError(f"cannot go from {old.value} to {new.value}")
