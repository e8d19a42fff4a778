"""`mm up` while it waits: the start phase from /status as a live line, and `mm status`'s state column.
Coded against the snapshot shape {"phase": {"name", "detail", "percent", "since"}}; without it, the
old fixed text."""
from __future__ import annotations

import io
import threading

import pytest
from rich.console import Console

from mmlib.cli import servers
from mmlib.errors import DaemonError

LOADING = {"name": "loading weights", "detail": "shard 1/2", "percent": 45.0, "since": 1000.0}
GRAPHS = {"name": "capturing CUDA graphs", "detail": "decode, FULL: 30/67", "percent": 44.8, "since": 1010.0}
COMPILING = {"name": "compiling", "detail": "torch.compile", "percent": None, "since": 1005.0}


def snapshot(state: str, phase: dict | None = None) -> dict:
    s = {"profile": "chat", "state": state, "served_model_name": "qwen"}
    if phase is not None:
        s["phase"] = phase
    return {"servers": [s]}


def test_phase_text_says_what_where_and_how_far():
    assert servers.phase_text(LOADING) == "loading weights 45% (shard 1/2)"
    assert servers.phase_text(COMPILING) == "compiling (torch.compile)"
    assert servers.phase_text(None) == servers.FALLBACK_TEXT


def test_only_a_starting_or_waking_server_has_a_phase_to_show():
    assert servers.starting_phase(snapshot("starting", LOADING))["name"] == "loading weights"
    assert servers.starting_phase(snapshot("awake", LOADING)) is None
    assert servers.starting_phase(snapshot("starting")) is None  # a daemon without phases


def test_status_shows_the_phase_in_the_state_column():
    assert servers.state_cell(snapshot("starting", GRAPHS)["servers"][0]) == \
        "[yellow]starting[/]: capturing CUDA graphs 45% (decode, FULL: 30/67)"
    assert servers.state_cell(snapshot("awake", GRAPHS)["servers"][0]) == "[green]awake[/]"
    assert servers.state_cell(snapshot("starting")["servers"][0]) == "[yellow]starting[/]"


class FakeDaemon:
    """/up answers after the phases have been shown; /status walks through them."""

    def __init__(self, phases: list[dict | None], fail: Exception | None = None):
        self.phases = phases
        self.polls = 0
        self.done = threading.Event()
        self.fail = fail

    def up(self) -> dict:
        self.done.wait(10)
        if self.fail:
            raise self.fail
        return {"proxy": "http://127.0.0.1:8000", "servers": []}

    def status(self) -> dict:
        phase = self.phases[min(self.polls, len(self.phases) - 1)]
        self.polls += 1
        if self.polls >= len(self.phases) + 1:
            self.done.set()
        if phase == "busy":
            raise DaemonError("the daemon did not answer /status in time")
        return snapshot("starting", phase)


def draw(daemon: FakeDaemon) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    frames: list[str] = []
    real_update = servers.phase_line

    def recording_line(action, phase, elapsed):  # every frame drawn, not only the last
        frames.append(servers.phase_text(phase))
        return real_update(action, phase, elapsed)

    servers.phase_line, saved = recording_line, servers.phase_line
    try:
        result = servers.wait_for_up(daemon.up, daemon.status, "starting chat", console, poll_s=0.01)
    finally:
        servers.phase_line = saved
    assert result["proxy"] == "http://127.0.0.1:8000"
    return "\n".join(frames) + "\n" + out.getvalue()


def test_mm_up_shows_each_phase_with_its_progress_while_it_waits():
    shown = draw(FakeDaemon([None, LOADING, "busy", COMPILING, GRAPHS]))
    for text in (servers.FALLBACK_TEXT, "loading weights 45% (shard 1/2)", "compiling (torch.compile)",
                 "capturing CUDA graphs 45% (decode, FULL: 30/67)"):
        assert text in shown
    assert "starting chat: capturing CUDA graphs 45%" in shown  # drawn on the terminal, bar and all
    assert "━" in shown  # the percent bar


def test_without_phases_the_old_spinner_text_stays():
    shown = draw(FakeDaemon([None, None, None]))
    assert servers.FALLBACK_TEXT in shown and "%" not in shown.replace("100%", "")


def test_an_error_from_the_daemon_reaches_the_caller():
    daemon = FakeDaemon([LOADING], fail=DaemonError("chat: could not start"))
    with pytest.raises(DaemonError, match="could not start"):
        servers.wait_for_up(daemon.up, daemon.status, "starting chat", Console(file=io.StringIO()), poll_s=0.01)


def test_a_phase_line_has_spinner_text_bar_and_elapsed():
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    console.print(servers.phase_line("starting chat", LOADING, 75))
    text = console.file.getvalue()
    assert "starting chat: loading weights 45% (shard 1/2)" in text and "1m15s" in text
