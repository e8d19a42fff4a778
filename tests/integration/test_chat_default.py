"""The embedded default answers sensibly, driven as a person would: `mm chat --once` fifteen times, and a
five-turn conversation in the interactive `mm chat` inside tmux. One vLLM start for the module."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
TURNS = ["What is the capital of France?", "And of Germany?", "Tell me one thing to see there.",
         "Write two sentences about the sea.", "Thank you!"]
LOOP_SHARE = 0.25  # a reply whose 4-word phrases are more than this share repeats is a loop


def repeated_share(text: str, n: int = 4) -> float:
    """The share of a reply's n-word phrases that already occurred earlier in it: ~0 for prose,
    near 1 for a reply that loops ("la femme, la femme, la femme, ...")."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2 * n:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def test_the_loop_measure_tells_loops_from_prose():
    assert repeated_share("The capital of France is Paris. It is known for the Eiffel Tower and the Louvre.") == 0
    loop = "L'Étoile, la Marseillaise, la femme, " + "la femme, " * 30
    assert repeated_share(loop) > 0.8
    assert repeated_share("Hi there!") == 0.0


def first_sentence(text: str) -> str:
    match = re.search(r"[.!?](\s|$)", text.strip())
    return text.strip()[:match.end()].strip() if match else text.strip()


# What the model invented before (issue 22): "L'Étoile de la Cité (The City of Love) - Paris."
FRENCH = re.compile(r"[À-ÿ]|\b(la|le|les|de|du|des|l')\b", re.IGNORECASE)
EVERYDAY = {"How many days are in a week?": "7", "What color is the sky on a clear day?": "blue",
            "What is 2 + 2?": "4", "How many legs does a spider have?": "8", "What is the opposite of hot?": "cold"}


def test_the_capital_of_france_first_in_ten_of_ten_fresh_answers(live_mm):
    """Fresh requests with the profile's generation defaults (no client settings): the first sentence
    names Paris, in English, every time; five everyday questions get the answer in theirs."""
    answers = [live_mm.mm("chat", "--once", QUESTION).stdout for _ in range(10)]
    firsts = [first_sentence(a) for a in answers]
    assert all("Paris" in f and not FRENCH.search(f) for f in firsts), firsts
    assert all(repeated_share(a) < LOOP_SHARE for a in answers), answers
    for question, expected in EVERYDAY.items():
        answer = live_mm.mm("chat", "--once", question).stdout
        assert expected in first_sentence(answer), f"{question!r} got {answer!r}"


class Tmux:
    """`mm chat` in a detached tmux session of its own server (-L), read back with capture-pane."""

    def __init__(self, env: dict, name: str = "mmchat"):
        self.sock = f"mm-test-{os.getpid()}"
        self.name = name
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        command = f"cd {shlex.quote(str(ROOT))} && env {exports} {shlex.quote(sys.executable)} -m mmlib chat; sleep 600"
        self.tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "50", command)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], check=True, capture_output=True, text=True).stdout

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.name).rstrip("\n").splitlines()

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def wait_prompt(self, prompts: int, timeout: float = 300) -> list[str]:
        """Wait until the REPL shows an empty prompt after `prompts` typed ones (the answer is done)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            lines = [line for line in self.screen() if line.strip()]
            typed = [line for line in lines if line.startswith("> ")]
            if lines and lines[-1].rstrip() == ">" and len(typed) >= prompts:
                return lines
            time.sleep(0.5)
        raise AssertionError("the REPL did not come back:\n" + "\n".join(self.screen()[-30:]))

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


def replies(lines: list[str], prompts: list[str]) -> list[str]:
    """The text between each typed prompt and the next prompt line."""
    out = []
    for p in prompts:
        start = max(i for i, line in enumerate(lines) if line.rstrip() == f"> {p}")
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(">"))
        out.append("\n".join(lines[start + 1:end]).strip())
    return out


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_a_five_turn_conversation_in_the_repl_never_loops(live_mm):
    term = Tmux(live_mm.env)
    try:
        term.wait_prompt(0, timeout=120)
        # Ctrl-C stops a long answer and the session goes on
        term.send("Write a very long story about a dragon.", "Enter")
        deadline = time.time() + 120
        while time.time() < deadline and len(term.screen()[-1].strip()) < 20:
            time.sleep(0.3)
        term.send("C-c")
        lines = term.wait_prompt(1, timeout=30)
        assert "[answer stopped]" in lines
        for n, question in enumerate(TURNS, start=2):
            term.send(question, "Enter")
            lines = term.wait_prompt(n)
        answers = replies(lines, TURNS)
        term.send("/exit", "Enter")
    finally:
        term.close()
    assert all(answers), answers
    for question, answer in zip(TURNS, answers):
        assert repeated_share(answer) < LOOP_SHARE, f"{question!r} got a looping reply: {answer!r}"
