"""A sleeping server gives the whole card back (issue 20): the fake vLLM on a fake card (its engine
holds 50 GiB awake, 1 GiB asleep) and a fake CUDA driver (tests/faults/fakegpu), through mm's own
daemon. A checkpointed engine leaves the card's list of processes; the fake vLLM answers 500 to a
wake_up that comes before its restore, as real vLLM would hang."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from mmlib.serve.client import Client

FAKE_GPU = Path(__file__).resolve().parent / "fakegpu"


@pytest.fixture
def ckpt_mm(fake_mm, tmp_path):
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    fake_mm.env.update(FAKE_GPU_DIR=str(gpu), MM_FAKE_CUDA_CHECKPOINT=str(tmp_path / "driver.json"),
                       PYTHONPATH=os.pathsep.join([str(FAKE_GPU), fake_mm.env["PYTHONPATH"]]))
    return fake_mm


def driver(fake) -> dict:
    path = Path(fake.env["MM_FAKE_CUDA_CHECKPOINT"])
    return json.loads(path.read_text()) if path.exists() else {"states": {}, "calls": []}


def fail_next(fake, call: str) -> None:
    doc = driver(fake)
    doc["fail"] = call
    Path(fake.env["MM_FAKE_CUDA_CHECKPOINT"]).write_text(json.dumps(doc))


def engine_pid(fake, profile: str) -> int:
    return fake.direct(profile).get("/argv").json()["engine_pid"]


def answer(fake, model: str) -> str:
    return fake.chat("x", model=model)["choices"][0]["message"]["content"]


def checkpoint(fake, profile: str) -> None:
    out = fake.mm("sleep", profile, "--checkpoint").stdout
    assert out.strip() == f"{profile}: checkpointed"


def daemon_log(fake) -> list[str]:
    return (Path(fake.env["MM_HOME"]) / "state" / "logs" / "daemon.log").read_text().splitlines()


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def wait_for(fn, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := fn():
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_sleep_checkpoint_wake_answers_the_same_text_and_the_card_is_all_free(ckpt_mm):
    ckpt_mm.add_profile("ck")
    ckpt_mm.mm("up", "ck", "--force")
    before, engine = answer(ckpt_mm, "ck"), engine_pid(ckpt_mm, "ck")
    assert ckpt_mm.server("ck")["memory"]["gpu_mib"] == 51200 and ckpt_mm.server("ck")["checkpoint"]
    checkpoint(ckpt_mm, "ck")
    s, card = ckpt_mm.server("ck"), ckpt_mm.status()["card"]
    assert s["state"] == "checkpointed" and s["checkpointed"] and s["memory"]["gpu_mib"] == 0
    assert s["memory"]["rss_mib"] > 0  # what it holds now is RAM
    assert card["free"] == card["capacity"] == 80 << 30  # the whole card back
    assert driver(ckpt_mm)["calls"] == [f"lock {engine}", f"checkpoint {engine}"]
    assert "checkpointed" in ckpt_mm.mm("status").stdout
    metrics = httpx.get(f"{ckpt_mm.proxy}/metrics").text
    assert 'mm_server_state{mm_server_state="checkpointed",model="ck"} 1.0' in metrics
    assert 'mm_server_gpu_memory_bytes{model="ck"} 0.0' in metrics

    assert answer(ckpt_mm, "ck") == before  # a request restores it, then wakes it
    assert driver(ckpt_mm)["calls"][2:] == [f"restore {engine}", f"unlock {engine}"]
    assert ckpt_mm.calls("ck") == ["request", "sleep:1", "wake_up", "request"]
    s = ckpt_mm.server("ck")
    assert s["state"] == "awake" and s["memory"]["gpu_mib"] == 51200 and engine_pid(ckpt_mm, "ck") == engine
    assert any("ck: checkpointed off the card" in line for line in daemon_log(ckpt_mm))


def test_level_two_sleeper_is_restored_then_reloads_its_weights(ckpt_mm):
    ckpt_mm.add_profile("deep", extra="")
    with open(Path(ckpt_mm.env["MM_HOME"]) / "config" / "profiles" / "deep.toml", "a") as f:
        f.write("level = 2\n")
    ckpt_mm.mm("up", "deep", "--force")
    before = answer(ckpt_mm, "deep")
    checkpoint(ckpt_mm, "deep")
    assert answer(ckpt_mm, "deep") == before and before
    assert ckpt_mm.calls("deep") == ["request", "sleep:2", "wake_up:weights", "rpc:reload_weights",
                                     "wake_up:kv_cache", "request"]


def test_a_failed_restore_starts_the_server_cold_with_one_log_line(ckpt_mm):
    ckpt_mm.add_profile("ck")
    ckpt_mm.mm("up", "ck", "--force")
    before, first_pid = answer(ckpt_mm, "ck"), ckpt_mm.server("ck")["pid"]
    checkpoint(ckpt_mm, "ck")
    fail_next(ckpt_mm, "restore")
    r = httpx.post(f"{ckpt_mm.proxy}/v1/chat/completions", timeout=60,
                   json={"model": "ck", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200, r.text  # the scheduler starts it again within the same switch and r.json()["choices"][0]["message"]["content"] == before
    s = ckpt_mm.server("ck")
    assert s["state"] == "awake" and s["pid"] != first_pid  # a cold start: a new process
    said = [line for line in daemon_log(ckpt_mm) if "restore from its checkpoint failed" in line]
    assert len(said) == 1 and "CUDA_ERROR_UNKNOWN" in said[0] and "starts again cold" in said[0], said


def test_a_failed_checkpoint_stops_the_server_and_says_why_in_one_line(ckpt_mm):
    ckpt_mm.add_profile("ck")
    ckpt_mm.mm("up", "ck", "--force")
    first_pid, engine = ckpt_mm.server("ck")["pid"], engine_pid(ckpt_mm, "ck")
    fail_next(ckpt_mm, "checkpoint")
    out = ckpt_mm.mm("sleep", "ck", "--checkpoint", check=False)
    assert out.returncode != 0 and "checkpoint failed" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # The lock it took was undone before the kill; the server is failed, its processes gone.
    assert driver(ckpt_mm)["calls"] == [f"lock {engine}", f"checkpoint {engine}", f"unlock {engine}"]
    assert ckpt_mm.server("ck")["state"] == "failed" and wait_for(lambda: gone(engine))
    assert answer(ckpt_mm, "ck")  # the next request starts it cold
    assert ckpt_mm.server("ck")["pid"] != first_pid


def test_a_crash_while_checkpointed_is_a_death_like_any_other(ckpt_mm):
    ckpt_mm.add_profile("ck")
    ckpt_mm.mm("up", "ck", "--force")
    engine = engine_pid(ckpt_mm, "ck")
    checkpoint(ckpt_mm, "ck")
    os.kill(engine, signal.SIGKILL)
    s = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(ckpt_mm.server("ck")), timeout=5)
    assert s["error"] == f"engine process {engine} died unexpectedly while checkpointed"
    assert answer(ckpt_mm, "ck")  # asleep when it died: it starts again on its next request
    assert ckpt_mm.server("ck")["state"] == "awake"


def test_a_new_daemon_keeps_a_checkpointed_server_and_restores_it_on_demand(ckpt_mm):
    ckpt_mm.add_profile("ck")
    ckpt_mm.mm("up", "ck", "--force")
    before, pid, engine = answer(ckpt_mm, "ck"), ckpt_mm.server("ck")["pid"], engine_pid(ckpt_mm, "ck")
    checkpoint(ckpt_mm, "ck")
    home = Path(ckpt_mm.env["MM_HOME"])
    assert json.loads((home / "state" / "servers" / "ck.json").read_text())["checkpointed_pids"] == [engine]
    daemon = int((home / "state" / "daemon.lock").read_text())
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: gone(daemon))
    ckpt_mm.mm("wake", "ck", "--force")  # a new daemon adopts it as it is, then the wake restores it
    assert f"adopted ck (pid {pid}, checkpointed)" in "\n".join(daemon_log(ckpt_mm))
    assert driver(ckpt_mm)["calls"][2:] == [f"restore {engine}", f"unlock {engine}"]
    assert ckpt_mm.server("ck")["pid"] == pid and answer(ckpt_mm, "ck") == before


def test_an_answer_paused_by_a_switch_survives_checkpoint_and_restore(ckpt_mm):
    """An answer paused with its server (sleep mode=keep) goes on, whole, after the server was
    checkpointed off the card and restored."""
    config = Path(ckpt_mm.env["MM_HOME"]) / "config"
    config.mkdir(parents=True, exist_ok=True)
    # The paused answer's way back waits switch_max_wait while the other model streams: the window
    # in which this test checkpoints it.
    (config / "config.toml").write_text("switch_max_wait = 4\nswitch_pause_after = 0.2\n")
    tokens = {"long": 200, "other": 100}  # 10 s and 5 s of answer: long's outlasts other's wait
    for name, n in tokens.items():
        ckpt_mm.add_profile(name, extra=f'[env]\nFAKE_TOKENS = "{n}"\nFAKE_TOKEN_DELAY = "0.05"\n')
    ckpt_mm.mm("up", "other", "--force")  # started before: the switch to it is a wake, not a start that
    ckpt_mm.mm("up", "long", "--force")  # would eat into the window below
    streams: dict[str, list[str]] = {"long": [], "other": []}

    def stream(model: str) -> None:
        with httpx.stream("POST", f"{ckpt_mm.proxy}/v1/chat/completions", timeout=120, json={
                "model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            streams[model] += [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    readers = [threading.Thread(target=stream, args=("long",))]
    readers[0].start()
    wait_for(lambda: ckpt_mm.server("long")["in_flight"])
    readers.append(threading.Thread(target=stream, args=("other",)))
    readers[1].start()
    # other's request waits 4 s, then long pauses with its answer and other streams; long's way back
    # then waits up to 4 s more for other's answer: the window for the checkpoint.
    wait_for(lambda: ckpt_mm.server("long")["state"] == "asleep" and ckpt_mm.server("other")["state"] == "awake")
    assert "sleep:1:keep" in ckpt_mm.calls("long") and ckpt_mm.server("long")["in_flight"] == 1
    sock = Path(ckpt_mm.env["MM_HOME"]) / "state" / "mm.sock"
    Client(sock=sock).post("/sleep", {"profile": "long", "checkpoint": True}, timeout=30)
    assert ckpt_mm.server("long")["state"] == "checkpointed"
    for r in readers:
        r.join(120)
    for model, chunks in streams.items():
        words = [json.loads(c)["choices"][0]["delta"]["content"] for c in chunks[:-1]]
        assert chunks[-1] == "[DONE]" and words == [f"tok{i} " for i in range(tokens[model])], model  # whole
    calls = ckpt_mm.calls("long")
    assert "sleep:1:keep" in calls and not any(c.startswith("aborted") for c in calls), calls
    engine = engine_pid(ckpt_mm, "long")
    assert f"restore {engine}" in driver(ckpt_mm)["calls"], (driver(ckpt_mm), daemon_log(ckpt_mm)[-30:])


def test_the_profile_and_config_keys_turn_it_off_with_one_line(ckpt_mm):
    ckpt_mm.add_profile("keep", extra="")
    with open(Path(ckpt_mm.env["MM_HOME"]) / "config" / "profiles" / "keep.toml", "a") as f:
        f.write("checkpoint = false\n")
    ckpt_mm.mm("up", "keep", "--force")
    assert not ckpt_mm.server("keep")["checkpoint"]
    out = ckpt_mm.mm("sleep", "keep", "--checkpoint", check=False)
    assert out.returncode and out.stderr.strip().count("\n") == 0 and "[sleep] checkpoint = false" in out.stderr
    assert ckpt_mm.server("keep")["state"] == "asleep" and driver(ckpt_mm)["calls"] == []  # asleep, untouched
    ckpt_mm.mm("daemon", "stop")
    (Path(ckpt_mm.env["MM_HOME"]) / "config" / "config.toml").write_text("checkpoint_sleepers = false\n")
    ckpt_mm.add_profile("ck")
    ckpt_mm.mm("up", "ck", "--force")
    assert not ckpt_mm.server("ck")["checkpoint"]
    out = ckpt_mm.mm("sleep", "ck", "--checkpoint", check=False)
    assert out.returncode and "checkpoint_sleepers" in out.stderr
    assert any("checkpoint_sleepers = false" in line for line in daemon_log(ckpt_mm))
