"""More than one GPU (issue 23, part 3) through mm's own daemon: the fake vLLM on two fake 80 GiB
cards (tests/faults/fakegpu, FAKE_GPU_COUNT=2). Each engine holds 50 GiB awake on every card its
CUDA_VISIBLE_DEVICES names, so two servers fit together only on cards of their own."""
from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

FAKE_GPU = Path(__file__).resolve().parent / "fakegpu"


@pytest.fixture
def two_cards(fake_mm, tmp_path):
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    fake_mm.env.update(FAKE_GPU_DIR=str(gpu), FAKE_GPU_COUNT="2",
                       PYTHONPATH=os.pathsep.join([str(FAKE_GPU), fake_mm.env["PYTHONPATH"]]))
    return fake_mm


def answer(fake, model: str) -> str:
    return fake.chat("x", model=model)["choices"][0]["message"]["content"]


def cards(fake) -> dict[int, dict]:
    return {c["index"]: c for c in fake.status()["cards"]}


def sleeps(fake, *profiles: str) -> list[str]:
    return [c for p in profiles for c in fake.calls(p) if c.startswith("sleep")]


def test_two_servers_pinned_to_different_cards_are_both_awake(two_cards):
    two_cards.add_profile("left", extra="gpus = [0]")
    two_cards.add_profile("right", extra="gpus = [1]")
    two_cards.mm("up", "left")
    two_cards.mm("up", "right")
    for _ in range(3):  # requests for both, in turn: nothing switches
        assert answer(two_cards, "left") and answer(two_cards, "right")
    left, right = two_cards.server("left"), two_cards.server("right")
    assert left["state"] == right["state"] == "awake" and sleeps(two_cards, "left", "right") == []
    assert (left["gpus"], right["gpus"]) == ([0], [1])
    assert two_cards.direct("right").get("/argv").json()["cuda_visible_devices"] == "1"
    assert left["memory"]["cards"] == {"0": 51200.0} and right["memory"]["cards"] == {"1": 51200.0}
    on = cards(two_cards)
    assert [s["profile"] for s in on[0]["servers"]] == ["left"] and [s["profile"] for s in on[1]["servers"]] == ["right"]
    assert on[1]["total"] == 80 << 30 and on[1]["used"] == 50 << 30
    status = two_cards.mm("status").stdout
    assert "card 1 (NVIDIA Fake H100): 30.0 GiB free of 80.0 GiB; right 50.0 GiB" in status
    assert "50.0 GiB (card 1)" in status
    metrics = httpx.get(f"{two_cards.proxy}/metrics", timeout=30).text
    assert 'mm_gpu_memory_used_bytes{gpu="1"} 5.36870912e+10' in metrics
    assert 'mm_server_gpu_card_memory_bytes{gpu="0",model="left"} 5.36870912e+10' in metrics


def test_a_split_server_holds_both_cards_and_a_server_on_one_of_them_puts_it_to_sleep(two_cards):
    two_cards.add_profile("big", extra='gpus = 2\nparallel = "tensor"')
    two_cards.add_profile("one")  # no card named: mm picks the least used
    two_cards.add_profile("other")
    two_cards.mm("up", "one")
    two_cards.mm("up", "other")  # the other card: both awake
    assert (two_cards.server("one")["gpus"], two_cards.server("other")["gpus"]) == ([0], [1])
    assert sleeps(two_cards, "one", "other") == []
    assert answer(two_cards, "big")  # 50 GiB on each card: both others must make room
    big = two_cards.server("big")
    assert big["gpus"] == [0, 1] and big["memory"]["cards"] == {"0": 51200.0, "1": 51200.0}
    argv = two_cards.direct("big").get("/argv").json()
    assert argv["cuda_visible_devices"] == "0,1" and "--tensor-parallel-size" in argv["argv"]
    assert argv["argv"][argv["argv"].index("--tensor-parallel-size") + 1] == "2"
    assert two_cards.server("one")["state"] == two_cards.server("other")["state"] == "asleep"
    assert {s["profile"] for c in cards(two_cards).values() for s in c["servers"] if s["state"] == "awake"} == {"big"}


def test_a_layout_the_machine_cannot_run_is_one_line_before_anything_starts(two_cards):
    two_cards.add_profile("four", extra='gpus = 4\nparallel = "tensor"')
    two_cards.add_profile("wide", extra='gpus = 2\nparallel = "data"')  # sleeps: refused
    r = two_cards.mm("up", "four", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "four.toml: gpus: needs 4 GPUs and this machine has 2: 0 (NVIDIA Fake H100), 1 (NVIDIA Fake H100)" in r.stderr
    r = two_cards.mm("up", "wide", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "wide.toml: parallel: vLLM's data parallelism and sleep mode are not reliable together" in r.stderr


def test_the_dp_vs_tp_benchmark_runs_dry(tmp_path):
    """benchmarks/dp_vs_tp.py's --dry: both layouts through mm on the fake cards, a line each, the ratio."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "dp_vs_tp.txt"
    r = subprocess.run([sys.executable, "benchmarks/dp_vs_tp.py", "--dry", "--concurrency", "1,8", "--out", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# benchmarks/dp_vs_tp.py") and "2x NVIDIA Fake H100" in lines[0]
    for parallel in ("data", "tensor"):
        runs = [line for line in lines if line.lstrip().startswith(f"{parallel} c=")]
        assert [line.split("(")[-1] for line in runs] == ["16/16 answered)", "32/32 answered)"]
        assert any(f"{parallel} parallel on cards [0, 1]" in line and "card 1 30.00" in line for line in lines)
    assert [line.split(" data")[0] for line in lines if "data / tensor" in line] == ["c=1   ", "c=8   "]
