"""Guard rails on every path a client opens (issue 21): a start the checks refuse is answered at once
and leaves the working model alone, a model gets only the requests it can answer, the hub is never
asked on the event loop, and a client that leaves is noticed while vLLM is silent."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx

from tests.faults.conftest import fake_model
from tests.faults.test_crash import wait_for

BODY = {"messages": [{"role": "user", "content": "x"}]}
WHISPER = json.dumps({"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"})


def control(fake) -> httpx.Client:
    sock = str(Path(fake.env["MM_HOME"]) / "state" / "mm.sock")
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://mm", timeout=30)


def write_profile(fake, name: str, text: str) -> None:
    d = Path(fake.env["MM_HOME"]) / "config" / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(text)


def working(fake) -> int:
    fake.add_profile("good")
    fake.mm("up", "good")
    return fake.server("good")["pid"]


def assert_untouched(fake, pid: int) -> None:
    """The working model is still awake, the same process, never put to sleep; it answers."""
    assert fake.server("good")["state"] == "awake" and fake.server("good")["pid"] == pid
    assert not any(c.startswith("sleep") for c in fake.calls("good"))
    assert fake.chat("x", model="good")["choices"]


def test_a_request_for_a_profile_the_checks_refuse_is_answered_at_once(fake_mm):
    pid = working(fake_mm)
    fake_mm.add_profile("typoflag", extra='[engine]\nkv_ofloading_backend = "native"\n')
    t0 = time.monotonic()
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", json={"model": "typoflag", **BODY}, timeout=60)
    took = time.monotonic() - t0
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and "retry-after" not in r.headers
    assert "typoflag.toml: engine.kv_ofloading_backend: " in error["message"] and "\n" not in error["message"]
    assert took < 2, took
    assert "typoflag" not in {s["profile"] for s in fake_mm.status()["servers"]}  # never started
    assert_untouched(fake_mm, pid)
    # The control API (mm up, switch, the page's buttons) gives the same line.
    r = control(fake_mm).post("/up", json={"profile": "typoflag"})
    assert r.status_code == 400 and r.json()["error"] == error["message"]
    assert_untouched(fake_mm, pid)


def test_a_model_not_on_disk_while_offline_is_refused_and_not_offered(fake_mm):
    pid = working(fake_mm)
    write_profile(fake_mm, "absent", 'model = "org/not-here"\nserved_model_name = "absent"\n')
    t0 = time.monotonic()
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", json={"model": "absent", **BODY}, timeout=60)
    assert r.status_code == 400 and time.monotonic() - t0 < 2
    assert "org/not-here is not on this machine and HF_HUB_OFFLINE is set" in r.json()["error"]["message"]
    assert "Traceback" not in r.text
    assert_untouched(fake_mm, pid)
    listed = httpx.get(f"{fake_mm.proxy}/v1/models").json()
    assert "absent" not in [m["id"] for m in listed["data"]] and "good" in [m["id"] for m in listed["data"]]
    (why,) = [m["mm"]["why"] for m in listed["mm_unavailable"] if m["id"] == "absent"]
    assert "HF_HUB_OFFLINE" in why


def test_requests_a_model_cannot_answer_name_the_endpoint_that_would(fake_mm):
    pid = working(fake_mm)
    fake_mm.add_profile("stt")
    fake_model(fake_mm.env, "fake/stt", WHISPER)
    r = httpx.post(f"{fake_mm.proxy}/v1/chat/completions", json={"model": "stt", **BODY}, timeout=60)
    assert r.status_code == 400 and "/v1/audio/transcriptions" in r.json()["error"]["message"]
    assert "stt" not in {s["profile"] for s in fake_mm.status()["servers"]}
    r = httpx.post(f"{fake_mm.proxy}/v1/embeddings", json={"model": "good", "input": "x"}, timeout=60)
    assert r.status_code == 400 and "does not answer /v1/embeddings" in r.json()["error"]["message"]
    # An endpoint vLLM lacks: its bare 404 becomes one line in OpenAI's shape.
    r = httpx.post(f"{fake_mm.proxy}/v1/audio/speech", json={"model": "good", "input": "x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["message"] == \
        "good does not answer /v1/audio/speech (its vLLM server has no such endpoint)"
    assert_untouched(fake_mm, pid)


def test_a_hub_that_hangs_does_not_stall_the_daemon(fake_mm):
    """Fitting a never-pulled model asks the hub for its metadata: in a thread, never on the loop that
    serves every stream and the control socket."""
    with socket.socket() as hub:  # accepts connections, never answers
        hub.bind(("127.0.0.1", 0))
        hub.listen(16)
        fake_mm.env.pop("HF_HUB_OFFLINE")
        fake_mm.env["HF_ENDPOINT"] = f"http://127.0.0.1:{hub.getsockname()[1]}"
        working(fake_mm)
        write_profile(fake_mm, "never", 'model = "org/never-pulled"\nserved_model_name = "never"\n'
                                        "startup_timeout = 30\n[memory]\ncontext = 2048\n")
        answer: dict = {}
        asking = threading.Thread(target=lambda: answer.update(r=httpx.post(
            f"{fake_mm.proxy}/v1/chat/completions", json={"model": "never", **BODY}, timeout=120)))
        asking.start()
        ping, took = control(fake_mm), []
        for _ in range(15):  # while the checks wait on the hub (10 s, its timeout)
            t0 = time.monotonic()
            assert httpx.get(f"{fake_mm.proxy}/health", timeout=30).status_code == 200
            assert ping.get("/ping").status_code == 200
            took.append(round(time.monotonic() - t0, 2))
            time.sleep(0.2)
        # A stalled loop answers after the hub's 10 s timeout; a busy 2-core box within a second.
        assert max(took) < 2, took
        asking.join(120)
        assert answer["r"].status_code == 200  # the hub's silence only costs the fit estimate


def test_a_client_that_leaves_a_silent_stream_is_released_at_once(fake_mm):
    """vLLM sends nothing for a while (a paused answer, a slow first token): the client's leaving
    is noticed then, not at the next chunk, so its count is released and vLLM aborts it."""
    fake_mm.add_profile("slow", extra='[env]\nFAKE_TOKENS = "3"\nFAKE_TOKEN_DELAY = "15"\n')
    fake_mm.mm("up", "slow")
    body = {"model": "slow", "stream": True, **BODY}
    with httpx.stream("POST", f"{fake_mm.proxy}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        wait_for(lambda: fake_mm.server("slow")["in_flight"] == 1, timeout=5)
    left = time.monotonic()
    wait_for(lambda: fake_mm.server("slow")["in_flight"] == 0, timeout=5)
    assert time.monotonic() - left < 5  # the first token would come after 15 s
