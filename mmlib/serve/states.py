"""The life of a vLLM server as one closed set of states and one table of allowed transitions.

Only ManagedServer._set_state changes a state, and it checks this table (llama-swap's swapState idea),
so an impossible sequence (waking a stopped server, say) fails loudly instead of corrupting things.
"""
from __future__ import annotations

from enum import Enum


class State(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    AWAKE = "awake"
    FALLING_ASLEEP = "falling asleep"
    ASLEEP = "asleep"
    CHECKPOINTED = "checkpointed"  # asleep and off the card: the CUDA driver holds its GPU state in RAM
    WAKING = "waking"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: dict[State, frozenset[State]] = {
    # AWAKE, ASLEEP and STARTING from STOPPED: a server adopted from a previous daemon
    State.STOPPED: frozenset({State.STARTING, State.AWAKE, State.ASLEEP}),
    State.STARTING: frozenset({State.AWAKE, State.FAILED, State.STOPPING}),
    State.AWAKE: frozenset({State.FALLING_ASLEEP, State.STOPPING, State.FAILED}),
    State.FALLING_ASLEEP: frozenset({State.ASLEEP, State.FAILED, State.STOPPING}),
    State.ASLEEP: frozenset({State.WAKING, State.STOPPING, State.FAILED, State.CHECKPOINTED}),
    # Restored and woken in one step (WAKING), or restored still asleep (ASLEEP: a switch restores its
    # target while it makes the rest of the room); a failed restore is a FAILED server, started again.
    State.CHECKPOINTED: frozenset({State.WAKING, State.ASLEEP, State.STOPPING, State.FAILED}),
    State.WAKING: frozenset({State.AWAKE, State.FAILED, State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING, State.STOPPED}),
}

# A process exists and holds (or may hold) GPU memory.
LIVE = frozenset({State.STARTING, State.AWAKE, State.FALLING_ASLEEP, State.ASLEEP, State.CHECKPOINTED,
                  State.WAKING, State.STOPPING})
# It holds (or is about to hold) its whole awake footprint.
AWAKE_ISH = frozenset({State.STARTING, State.AWAKE, State.WAKING})


class TransitionError(RuntimeError):
    pass


def check_transition(old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise TransitionError(f"cannot go from {old.value} to {new.value}")
