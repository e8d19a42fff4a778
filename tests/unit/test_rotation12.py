"""benchmarks/rotation12.py's own logic on canned input: the rotation, what mm did at a switch (read
from `mm status` before and after), the lines of the result file and the summary."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
rotation12 = pytest.importorskip("rotation12")


def test_the_device_tag_comes_from_nvmls_name():
    assert rotation12.device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert rotation12.device_tag("NVIDIA H200") == "h200"
    assert rotation12.device_tag("NVIDIA GeForce RTX 4070") == "nvidiageforcertx4070"


def test_the_rotation_visits_every_profile_each_round_and_never_twice_in_a_row():
    profiles = ["chat", "perf", "voice", "ocr", "baseline", "default"]
    for seed in range(50):
        order = rotation12.rotation(profiles, 3, seed, after="default")
        assert len(order) == 18 and all(sorted(order[i:i + 6]) == sorted(profiles) for i in (0, 6, 12))
        assert all(a != b for a, b in zip(["default", *order], order))
    assert rotation12.rotation(profiles, 3, 12) == rotation12.rotation(profiles, 3, 12)  # seeded


def test_the_kind_of_a_switch_is_what_mm_did_to_the_targets_servers():
    asleep, checkpointed = {"state": "asleep", "pid": 10}, {"state": "checkpointed", "pid": 11}
    awake = lambda pid: {"state": "awake", "pid": pid}  # noqa: E731
    kind = rotation12.switch_kind
    assert kind(["chat"], {"chat": checkpointed}, {"chat": awake(11)}) == "restore"
    assert kind(["chat"], {"chat": asleep}, {"chat": awake(10)}) == "wake"
    assert kind(["chat"], {"chat": checkpointed}, {"chat": awake(99)}) == "restart"  # a failed restore: cold
    assert kind(["chat"], {"chat": {"state": "stopped", "pid": None}}, {"chat": awake(5)}) == "restart"
    assert kind(["chat"], {}, {"chat": awake(5)}) == "restart"  # never ran
    assert kind(["chat"], {"chat": awake(3)}, {"chat": awake(3)}) == "awake"
    # a stack is as slow as its slowest member
    assert kind(["llm", "stt"], {"llm": checkpointed, "stt": asleep}, {"llm": awake(11), "stt": awake(10)}) == "restore"


def test_the_profile_line_sums_a_stacks_members():
    servers = {"voice-llm": {"memory": {"gpu_mib": 0.0, "rss_mib": 3072}},
               "voice-stt": {"memory": {"gpu_mib": 20.48, "rss_mib": 1024}}, "chat": {"memory": {"gpu_mib": None}}}
    assert rotation12.profile_line("voice", ["voice-llm", "voice-stt"], servers) == \
        "profile=voice asleep_gpu_gib=0.02 asleep_ram_gib=4.00"
    assert rotation12.profile_line("chat", ["chat"], servers) == "profile=chat asleep_gpu_gib=n/a asleep_ram_gib=n/a"


CANNED = """\
switch from=default to=ocr kind=restore first_token_s=0.812 greedy_same=True
switch from=ocr to=perf kind=restore first_token_s=1.900 greedy_same=True
switch from=perf to=chat kind=restart first_token_s=61.204 greedy_same=False
switch from=chat to=voice kind=wake first_token_s=0.240 greedy_same=True
switch from=voice to=default kind=restore first_token_s=n/a greedy_same=False
"""


def test_switch_lines_read_back_and_the_summary():
    switches = [rotation12.parse_switch(line) for line in CANNED.splitlines()]
    assert [s.line() for s in switches] == CANNED.splitlines()
    assert rotation12.summary_line(switches) == "round: switches=5 restarts=1 failed=1 p50_s=1.356 max_s=61.204"
    assert rotation12.summary_line([]) == "round: switches=0 restarts=0 failed=0 p50_s=n/a max_s=n/a"
