"""The sleep path, which only a GPU exercises for real: order of calls and the state shown."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx


def ask(fake, model: str) -> dict:
    r = httpx.post(f"{fake.proxy}/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


def test_switch_sleeps_the_other_and_wakes_the_target(fake_mm):
    fake_mm.add_profile("model-a")
    fake_mm.add_profile("model-b")
    fake_mm.mm("up", "model-a", "--force")
    assert ask(fake_mm, "model-b")["model"] == "model-b"  # first sight of b: started while a sleeps
    assert fake_mm.server("model-a")["state"] == "asleep"
    assert fake_mm.server("model-b")["state"] == "awake"
    assert ask(fake_mm, "model-a")["model"] == "model-a"  # back to a: b sleeps, a wakes
    assert fake_mm.calls("model-a") == ["sleep:1", "wake_up", "request"]
    assert fake_mm.calls("model-b") == ["request", "sleep:1"]
    a, b = fake_mm.server("model-a"), fake_mm.server("model-b")
    assert (a["state"], b["state"]) == ("awake", "asleep")
    assert a["switch"] == "sleep/wake" and a["last_switch_s"] is not None
    table = fake_mm.mm("status").stdout
    assert "asleep" in table and "sleep/wake" in table


def test_sleep_level_two_and_explicit_commands(fake_mm):
    fake_mm.add_profile("deep", extra="")
    d = fake_mm.env["MM_HOME"] + "/config/profiles/deep.toml"
    with open(d, "a") as f:
        f.write("level = 2\n")
    fake_mm.mm("up", "deep", "--force")
    before = fake_mm.chat("x", model="deep")["choices"][0]["message"]["content"]
    fake_mm.mm("sleep", "deep")
    assert fake_mm.server("deep")["state"] == "asleep"
    fake_mm.mm("wake", "deep", "--force")
    # Level 2 dropped the weights: a plain wake_up would answer garbage (the fake: empty text).
    assert fake_mm.calls("deep") == ["request", "sleep:2", "wake_up:weights", "rpc:reload_weights",
                                     "wake_up:kv_cache"]
    after = fake_mm.chat("x", model="deep")["choices"][0]["message"]["content"]
    assert before and after == before


def test_a_request_wakes_a_level_two_sleeper_whole(fake_mm):
    fake_mm.add_profile("deep2")
    with open(fake_mm.env["MM_HOME"] + "/config/profiles/deep2.toml", "a") as f:
        f.write("level = 2\n")
    fake_mm.add_profile("other")
    fake_mm.mm("up", "deep2", "--force")
    before = fake_mm.chat("x", model="deep2")["choices"][0]["message"]["content"]
    fake_mm.chat("x", model="other")  # the switch puts deep2 to sleep at level 2
    assert fake_mm.server("deep2")["state"] == "asleep"
    assert fake_mm.chat("x", model="deep2")["choices"][0]["message"]["content"] == before


def test_profile_without_sleep_falls_back_to_stop_and_start(fake_mm):
    fake_mm.add_profile("nosleep-a", sleep=False)
    fake_mm.add_profile("nosleep-b", sleep=False)
    fake_mm.mm("up", "nosleep-a", "--force")
    first_pid = fake_mm.server("nosleep-a")["pid"]
    ask(fake_mm, "nosleep-b")
    assert fake_mm.server("nosleep-a")["state"] == "stopped"
    assert fake_mm.server("nosleep-b")["switch"] == "stop/start"
    ask(fake_mm, "nosleep-a")
    assert fake_mm.server("nosleep-a")["pid"] != first_pid  # a new process, not a wake-up


def test_default_model_means_the_active_one(fake_mm):
    fake_mm.add_profile("model-a")
    fake_mm.add_profile("model-b")
    fake_mm.mm("up", "model-b", "--force")
    assert ask(fake_mm, "default")["model"] == "model-b"
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.json()["model"] == "model-b"


def test_unknown_model_is_404_with_known_names(fake_mm):
    fake_mm.add_profile("model-a")
    fake_mm.mm("up", "model-a", "--force")
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code == 404
    assert "model-a" in r.json()["error"]["known_models"]


def test_models_endpoint_lists_every_profile_with_state(fake_mm):
    fake_mm.add_profile("model-a")
    fake_mm.add_profile("model-b")
    fake_mm.mm("up", "model-a", "--force")
    data = {m["id"]: m for m in httpx.get(f"{fake_mm.proxy}/v1/models").json()["data"]}
    assert data["model-a"]["mm"]["state"] == "awake"
    assert data["model-b"]["mm"]["state"] == "stopped"
    assert "smollm2" in data  # shipped profiles too


def test_client_disconnect_mid_stream_frees_the_upstream(fake_mm):
    fake_mm.add_profile("slow", extra="[env]\nFAKE_TOKENS = \"200\"\nFAKE_TOKEN_DELAY = \"0.05\"\n")
    fake_mm.mm("up", "slow", "--force")
    with httpx.stream("POST", f"{fake_mm.proxy}/v1/chat/completions", timeout=30, json={
            "model": "slow", "stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": "x"}]}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # the client goes away after a few chunks
    deadline = time.time() + 5
    while time.time() < deadline and fake_mm.server("slow")["in_flight"]:
        time.sleep(0.05)
    assert fake_mm.server("slow")["in_flight"] == 0


def test_stack_brings_its_members_awake_together_and_the_rest_to_sleep(fake_mm):
    fake_mm.add_profile("other")
    fake_mm.add_profile("stt", extra="share_gpu = true\n[engine]\ngpu_memory_utilization = 0.3\n")
    fake_mm.add_profile("llm", extra="share_gpu = true\n[engine]\ngpu_memory_utilization = 0.6\n")
    d = fake_mm.env["MM_HOME"] + "/config/profiles/"
    with open(d + "duo.toml", "w") as f:
        f.write('stack = ["stt", "llm"]\n')
    fake_mm.mm("up", "other", "--force")
    fake_mm.mm("up", "duo", "--force")
    states = {s["profile"]: s["state"] for s in fake_mm.status()["servers"]}
    assert states == {"other": "asleep", "stt": "awake", "llm": "awake"}
    ask(fake_mm, "stt")
    ask(fake_mm, "llm")  # both answer without a switch between them
    assert fake_mm.calls("stt") == ["request"] and fake_mm.calls("llm") == ["request"]


def test_stack_whose_shares_do_not_fit_is_refused(fake_mm):
    fake_mm.add_profile("big1", extra="share_gpu = true\n[engine]\ngpu_memory_utilization = 0.7\n")
    fake_mm.add_profile("big2", extra="share_gpu = true\n[engine]\ngpu_memory_utilization = 0.7\n")
    with open(fake_mm.env["MM_HOME"] + "/config/profiles/toobig.toml", "w") as f:
        f.write('stack = ["big1", "big2"]\n')
    r = fake_mm.mm("up", "toobig", "--force", check=False)
    assert r.returncode == 1 and "1.40" in r.stderr and "gpu_memory_utilization" in r.stderr


def test_idle_policy_sleeps_then_stops(fake_mm):
    fake_mm.add_profile("idler", extra="idle_sleep = 1\nidle_stop = 3\n")
    fake_mm.mm("up", "idler", "--force")
    seen, deadline = [], time.monotonic() + 15
    while time.monotonic() < deadline and (not seen or seen[-1] != "stopped"):
        state = fake_mm.server("idler")["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        time.sleep(0.05)
    assert [s for s in seen if s != "stopping"] == ["awake", "asleep", "stopped"]
    ask(fake_mm, "idler")  # a request brings it back
    assert fake_mm.server("idler")["state"] == "awake"


def test_another_model_for_a_running_profile_replaces_its_server(fake_mm):
    fake_mm.add_profile("chatty")
    fake_mm.mm("up", "chatty", "--force")
    first = fake_mm.server("chatty")["pid"]
    fake_mm.mm("up", "chatty", "--model", "org/other-model", "--force")
    s = fake_mm.server("chatty")
    assert s["pid"] != first and s["model"] == "org/other-model" and s["served_model_name"] == "other-model"
    assert ask(fake_mm, "other-model")["model"] == "other-model"  # routed though no file names it


def test_a_long_answer_pauses_for_a_switch_and_ends_whole(fake_mm):
    """A request for another model waits the bound, not the length of an answer in flight: that
    answer pauses with its server (vLLM's sleep mode=keep) and goes on, every token, once it is back."""
    config = Path(fake_mm.env["MM_HOME"]) / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "config.toml").write_text("switch_max_wait = 0.2\nswitch_pause_after = 0.2\n")
    fake_mm.add_profile("long", extra='[env]\nFAKE_TOKENS = "100"\nFAKE_TOKEN_DELAY = "0.03"\n')
    fake_mm.add_profile("quick")
    fake_mm.mm("up", "long", "--force")
    chunks: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{fake_mm.proxy}/v1/chat/completions", timeout=60, json={
                "model": "long", "stream": True, "max_tokens": 100,
                "messages": [{"role": "user", "content": "x"}]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    first.set()
    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(30)
    t0 = time.monotonic()
    assert ask(fake_mm, "quick")["model"] == "quick"
    waited = time.monotonic() - t0
    reader.join(60)
    assert waited < 2.0, waited  # 0.2 s hold + 0.2 s for the answer in flight + the switch; not its 3 s
    words = [json.loads(c)["choices"][0]["delta"]["content"] for c in chunks[:-1]]
    assert chunks[-1] == "[DONE]" and words == [f"tok{i} " for i in range(100)]  # whole, in order
    calls = fake_mm.calls("long")
    assert "sleep:1:keep" in calls and not any(c.startswith("aborted") for c in calls)
    assert fake_mm.server("long")["state"] == "awake"  # it came back for its paused answer
