"""/metrics and the page's API on a real daemon over the fake vLLM: a scripted run (N requests, K
switches) read back from the counters; the API key on everything with data; results read-only."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def total(found: list, name: str, **labels) -> float:
    return sum(s.value for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def chat(fake, model: str, stream: bool = False, **extra) -> httpx.Response:
    r = httpx.post(f"{fake.proxy}/v1/chat/completions", timeout=60, json={
        "model": model, "stream": stream, "max_tokens": 5, "messages": [{"role": "user", "content": "one two"}], **extra})
    assert r.status_code == 200, r.text
    return r


def test_a_scripted_run_reads_back_from_the_counters(fake_mm):
    fake_mm.add_profile("model-a")
    fake_mm.add_profile("model-b")
    fake_mm.mm("up", "model-a", "--force")  # switch 1: none -> a
    script = ["model-a", "model-a", "model-b", "model-b", "model-b", "model-a", "model-b"]  # N = 7
    switches = 4  # and a -> b, b -> a, a -> b
    for i, model in enumerate(script):
        r = chat(fake_mm, model, stream=i % 2 == 1)
        if i % 2:
            assert '"usage"' not in r.text  # mm asked vLLM for usage; this client never sees it
    asked = chat(fake_mm, "model-b", stream=True, stream_options={"include_usage": True})  # N = 8
    assert '"usage"' in asked.text  # a client that asks gets it
    assert fake_mm.direct('model-b').get("/last_body").json()["stream_options"] == {"include_usage": True}

    found = samples(httpx.get(f"{fake_mm.proxy}/metrics").text)
    n = len(script) + 1
    assert total(found, "mm_requests_total") == n
    assert total(found, "mm_requests_total", model="model-a", code="200") == 3
    assert total(found, "mm_request_errors_total") == 0
    assert total(found, "mm_switches_total") == switches
    assert total(found, "mm_switches_total", **{"from": "model-a", "to": "model-b"}) == 2
    assert total(found, "mm_switch_duration_seconds_count") == switches
    for histogram in ("mm_time_to_first_token_seconds", "mm_queue_wait_seconds", "mm_request_duration_seconds"):
        assert total(found, f"{histogram}_count") == n, histogram
        assert total(found, f"{histogram}_bucket", le="+Inf") == n, histogram
    # Tokens counted by the proxy from usage equal what each vLLM counted itself (re-exported).
    for model in ("model-a", "model-b"):
        assert total(found, "mm_tokens_total", model=model, direction="out") == \
            total(found, "vllm:generation_tokens_total", model=model) > 0
        assert total(found, "mm_tokens_total", model=model, direction="in") == \
            total(found, "vllm:prompt_tokens_total", model=model) > 0
        assert total(found, "mm_vllm_scrape_ok", model=model) == 1
    assert total(found, "mm_server_state", model="model-b", mm_server_state="awake") == 1
    assert total(found, "mm_server_state", model="model-a", mm_server_state="asleep") == 1
    assert total(found, "mm_server_ram_bytes", model="model-a") > 0
    assert total(found, "vllm:engine_sleep_state", model="model-a", sleep_state="weights_offloaded") == 1

    events = page_snapshot(fake_mm.proxy)["events"]
    assert [e["model"] for e in events if e["kind"] == "request"] == script + ["model-b"]
    assert len([e for e in events if e["kind"] == "switch"]) == switches


def page_snapshot(proxy: str, headers: dict | None = None) -> dict:
    """The first message of the page's event stream."""
    with httpx.stream("GET", f"{proxy}/mm/api/events", headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in r.iter_lines():
            if not line:
                break
            lines.append(line)
    assert lines[0] == "event: snapshot"
    return json.loads(lines[1].removeprefix("data: "))


def test_the_api_key_guards_metrics_and_the_pages_data_but_not_the_empty_page(fake_mm):
    fake_mm.env["MM_API_KEY"] = "s3cret"
    fake_mm.add_profile("guarded")
    fake_mm.mm("up", "guarded", "--force")
    good, bad = {"authorization": "Bearer s3cret"}, {"authorization": "Bearer nope"}
    guarded = [("GET", "/metrics"), ("GET", "/mm/api/status"), ("GET", "/mm/api/events"),
               ("GET", "/mm/api/logs/guarded"), ("GET", "/mm/api/results"), ("GET", "/mm/results/summary.md"),
               ("GET", "/mm/api/results/html/summary.md"), ("POST", "/mm/api/sleep/guarded")]
    with httpx.Client(base_url=fake_mm.proxy, timeout=30) as client:
        for method, path in guarded:
            for headers in (None, bad):
                assert client.request(method, path, headers=headers).status_code == 401, (path, headers)
        assert fake_mm.server("guarded")["state"] == "awake"  # the refused sleep did nothing
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.get("/mm/api/status", headers=good).json()["servers"][0]["profile"] == "guarded"
        assert client.get("/mm/api/logs/guarded", headers=good).status_code == 200
        page = client.get("/")  # the page holds no data: it asks for the key itself
        assert page.status_code == 200 and "/mm/static/mm.js" in page.text
        assert client.get("/mm/static/mm.js").status_code == 200
    assert page_snapshot(fake_mm.proxy, good)["status"]["servers"][0]["state"] == "awake"


def wait_for_state(fake, profile: str, state: str, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if fake.server(profile)["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"{profile} is {fake.server(profile)['state']}, not {state}")


def test_page_actions_logs_and_profiles(fake_mm):
    fake_mm.add_profile("model-a")
    fake_mm.add_profile("model-b")
    fake_mm.mm("up", "model-a", "--force")
    with httpx.Client(base_url=fake_mm.proxy, timeout=60) as client:
        status = client.get("/mm/api/status").json()
        names = {p["name"] for p in status["profiles"]}
        assert {"model-a", "model-b", "default", "voice"} <= names  # every profile, stacks too
        forged = client.post("/mm/api/sleep/model-a", headers={"origin": "http://evil.example"})
        assert forged.status_code == 403  # another site's page in the user's browser (CSRF)
        assert fake_mm.server("model-a")["state"] == "awake"
        own = client.post("/mm/api/sleep/model-a", headers={"origin": fake_mm.proxy})  # as the page sends it
        assert own.json()["ok"]
        assert fake_mm.server("model-a")["state"] == "asleep"
        woke = client.post("/mm/api/wake/model-b")  # a cold start: 202 if it takes over 2 s
        assert woke.status_code in (200, 202)
        wait_for_state(fake_mm, "model-b", "awake")
        refused = client.post("/mm/api/stop/nothing-runs-here")
        assert refused.status_code == 409 and "not running" in refused.json()["error"]
        assert client.post("/mm/api/explode/model-a").status_code == 404
        assert client.post("/mm/api/wake/..%2F..%2Fetc").status_code == 404
        log = client.get("/mm/api/logs/model-b").json()
        assert log["lines"][0].startswith("# mm: starting model-b")
        assert client.get("/mm/api/logs/no-such-profile").status_code == 404
    actions = [e for e in page_snapshot(fake_mm.proxy)["events"] if e["kind"] == "action"]
    assert sorted((e["action"], e["model"], e["ok"]) for e in actions) == [
        ("sleep", "model-a", True), ("stop", "nothing-runs-here", False), ("wake", "model-b", True)]


def test_results_are_browsable_read_only_and_nothing_outside_them(fake_mm, tmp_path):
    results = Path(fake_mm.env["MM_RESULTS_DIR"])
    (results / "qwen").mkdir(parents=True)
    (results / "summary.md").write_text("# mm benchmark results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                                        "![memory](memory.png)\n![far](https://example.com/x.png)\n<script>x</script>\n")
    (results / "memory.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (results / "qwen" / "20260101-000000-bench.json").write_text('{"kind": "bench"}')
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": true}')
    os.symlink(secret, results / "qwen" / "link.json")
    (results / "notes.sh").write_text("echo not served")
    fake_mm.add_profile("model-a")
    fake_mm.mm("up", "model-a", "--force")
    with httpx.Client(base_url=fake_mm.proxy, timeout=30) as client:
        listed = [f["path"] for f in client.get("/mm/api/results").json()["files"]]
        assert listed == ["memory.png", "summary.md", "qwen/20260101-000000-bench.json"]
        assert client.get("/mm/results/qwen/20260101-000000-bench.json").json() == {"kind": "bench"}
        assert client.get("/mm/results/memory.png").headers["content-type"] == "image/png"
        html = client.get("/mm/api/results/html/summary.md").json()["html"]
        assert "<table>" in html and 'data-result="memory.png"' in html
        assert "<script>" not in html and "example.com" not in html  # no markup, nothing from elsewhere
        for path in ("qwen/link.json", "notes.sh", "..%2F..%2Fsecret.json", "qwen/..%2F..%2F..%2Fsecret.json",
                     "%2Fetc%2Fpasswd", "nothing.json"):
            assert client.get(f"/mm/results/{path}").status_code == 404, path
        assert client.put("/mm/results/summary.md", content=b"x").status_code == 405


def test_an_open_page_does_not_keep_the_daemon_from_stopping(fake_mm):
    fake_mm.add_profile("model-a")
    fake_mm.mm("up", "model-a", "--force")
    ended = threading.Event()

    def watch():  # a page left open: its event stream never ends by itself
        with httpx.stream("GET", f"{fake_mm.proxy}/mm/api/events", timeout=60) as r:
            for _ in r.iter_lines():
                pass
        ended.set()

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(1)
    fake_mm.mm("daemon", "stop")
    sock = Path(fake_mm.env["MM_HOME"]) / "state" / "mm.sock"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and sock.exists():
        time.sleep(0.05)
    assert not sock.exists() and ended.wait(5)
