"""mm batch's parts: the input's lines, the resumable output, the requests a prompt needs, the retry
policy (against a small aiohttp server of the test's own), and the progress line off a terminal."""
from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from aiohttp import web

from mmlib.batch import inputs, progress, requests
from mmlib.batch.runner import RetryPolicy, Runner
from mmlib.batch.store import ErrorLog, OutputStore, errors_path
from mmlib.errors import MMError


def write_lines(path: Path, *lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def out_line(item_id, sample, model="m") -> str:
    return json.dumps({"id": item_id, "sample": sample, "text": "t", "finish_reason": "stop",
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1}, "model": model})


# --- input ------------------------------------------------------------------------------------------------
def test_input_lines_prompts_messages_overrides_and_blank_lines(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", {"id": 1, "prompt": "hi"}, "",
                       {"id": "b", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                        "max_tokens": 5, "temperature": 0, "answer": "kept out"})
    index = inputs.scan(path)
    assert index.lines == {1: 1, "b": 3}
    items = list(inputs.read(path))
    assert items[0] == inputs.Item(1, [{"role": "user", "content": "hi"}])
    assert items[1].messages[1]["content"] == "q" and items[1].max_tokens == 5 and items[1].temperature == 0.0


@pytest.mark.parametrize("line, says", [
    ('{"id": 1, "prompt": "a"', "in.jsonl:2: not valid JSON"),
    ('[1, 2]', "in.jsonl:2: a line must be a JSON object"),
    ('{"prompt": "a"}', "in.jsonl:2: no \"id\""),
    ('{"id": true, "prompt": "a"}', "\"id\" must be a string or an integer"),
    ('{"id": 2}', "give either \"prompt\""),
    ('{"id": 2, "prompt": "a", "messages": []}', "not both"),
    ('{"id": 2, "prompt": ["a"]}', "\"prompt\" must be a string"),
    ('{"id": 2, "messages": [{"content": "a"}]}', "\"messages\" must be a non-empty list"),
    ('{"id": 2, "prompt": "a", "max_tokens": 0}', "\"max_tokens\" must be a whole number"),
    ('{"id": 2, "prompt": "a", "temperature": "hot"}', "\"temperature\" must be a number"),
    ('{"id": 1, "prompt": "again"}', "in.jsonl:2: id 1 again (first on line 1)"),
])
def test_a_bad_input_line_is_one_line_naming_file_and_line(tmp_path, line, says):
    path = write_lines(tmp_path / "in.jsonl", {"id": 1, "prompt": "a"}, line)
    with pytest.raises(MMError) as e:
        inputs.scan(path)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_an_input_without_prompts_or_missing_is_one_line(tmp_path):
    with pytest.raises(MMError, match="no such file"):
        inputs.scan(tmp_path / "nope.jsonl")
    with pytest.raises(MMError, match="no prompts in it"):
        inputs.scan(write_lines(tmp_path / "empty.jsonl", ""))


# --- output: resume -----------------------------------------------------------------------------------------
IDS = {"a": 1, "b": 2, 3: 3}


def test_a_new_output_is_created_and_appended_whole_lines(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    with OutputStore.open(path, IDS) as store:
        assert store.recovered.done == {} and store.recovered.lines == 0
        store.append((out_line("a", 0) + "\n").encode())
        store.sync()
    with OutputStore.open(path, IDS) as store:
        assert store.recovered.done == {"a": 1} and store.recovered.models == {"m"}


def test_partial_samples_are_counted_per_id(tmp_path):
    path = write_lines(tmp_path / "out.jsonl", out_line("a", 0), out_line("a", 2), out_line(3, 1), out_line("a", 5))
    with OutputStore.open(path, IDS) as store:
        rec = store.recovered
    assert rec.done == {"a": 0b100101, 3: 0b10}
    assert requests.missing(rec.done["a"], 3) == [1] and requests.missing(rec.done.get("b", 0), 2) == [0, 1]
    assert rec.done_within(3) == 3 and rec.lines == 4  # sample 5 is beyond -n 3: kept, not counted


@pytest.mark.parametrize("tail", [b'{"id": "b", "sam', b"\0" * 300, b"\0" * 40 + b"\n" + b"\0" * 9])
def test_a_torn_last_line_is_cut_off_and_its_samples_sent_again(tmp_path, tail):
    path = write_lines(tmp_path / "out.jsonl", out_line("a", 0), out_line("b", 0))
    whole = path.read_bytes()
    path.write_bytes(whole + tail)
    with OutputStore.open(path, IDS) as store:
        assert store.recovered.torn_bytes == len(tail)
        assert store.recovered.done == {"a": 1, "b": 1}
        store.append((out_line("b", 1) + "\n").encode())
    assert path.read_bytes() == whole + (out_line("b", 1) + "\n").encode()


@pytest.mark.parametrize("lines, says", [
    ([out_line("a", 0), "not json", out_line("b", 0)], "out.jsonl:2: not a line mm batch writes"),
    ([out_line("a", 0), out_line("zz", 0)], "out.jsonl:2: id \"zz\" is not in in.jsonl"),
    ([out_line("a", 0), out_line("a", 0)], "out.jsonl:2: sample 0 of id \"a\" is in the file twice"),
    ([out_line("a", -1)], "\"sample\" must be a sample index"),
    ([out_line("a", 0), "\0\0\0", out_line("b", 0)], "out.jsonl:2: a damaged line"),
])
def test_an_output_that_does_not_fit_is_one_line_and_left_untouched(tmp_path, lines, says):
    path = write_lines(tmp_path / "out.jsonl", *lines)
    before = path.read_bytes() + b'{"torn'
    path.write_bytes(before)
    with pytest.raises(MMError) as e:
        OutputStore.open(path, IDS, "in.jsonl")
    assert says in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == before  # not even the torn tail is cut: nothing is touched


def test_a_second_writer_on_the_same_output_is_refused(tmp_path):
    path = write_lines(tmp_path / "out.jsonl", out_line("a", 0))
    with OutputStore.open(path, IDS):
        with pytest.raises(MMError, match="another mm batch is writing it"):
            OutputStore.open(path, IDS)
    OutputStore.open(path, IDS).close()  # free again once the first closed


def test_the_errors_sidecar_is_named_after_the_output():
    assert errors_path(Path("/x/out.jsonl")) == Path("/x/out.errors.jsonl")
    assert errors_path(Path("/x/out")) == Path("/x/out.errors.jsonl")


# --- requests ---------------------------------------------------------------------------------------------
ITEM = inputs.Item("q", [{"role": "user", "content": "hi"}])


def test_the_missing_samples_of_a_prompt_share_one_request():
    [job] = requests.jobs_for(ITEM, [0, 2, 3], "m", requests.Settings(samples=4, temperature=0.5, max_tokens=8))
    assert job.samples == [0, 2, 3]
    assert json.loads(job.payload) == {"model": "m", "messages": ITEM.messages, "n": 3, "return_token_ids": True,
                                       "max_tokens": 8, "temperature": 0.5}
    [single] = requests.jobs_for(ITEM, [1], "m", requests.Settings(samples=2, ignore_eos=True, top_p=0.9))
    assert json.loads(single.payload) == {"model": "m", "messages": ITEM.messages, "top_p": 0.9, "ignore_eos": True}


def test_with_a_seed_sample_k_is_drawn_with_seed_plus_k():
    jobs = requests.jobs_for(ITEM, [0, 1, 3, 5, 6], "m", requests.Settings(samples=7, temperature=1, seed=100))
    assert [(j.samples, j.body["seed"], j.body.get("n")) for j in jobs] == \
        [([0, 1], 100, 2), ([3], 103, None), ([5, 6], 105, 2)]
    parts = requests.split(jobs[2])
    assert [(j.samples, j.body["seed"], "n" in j.body) for j in parts] == [([5], 105, False), ([6], 106, False)]


def test_greedy_samples_go_one_request_each():
    s = requests.Settings(samples=2, default_temperature=0.0)
    assert [j.samples for j in requests.jobs_for(ITEM, [0, 1], "m", s)] == [[0], [1]]
    hot = inputs.Item("q", ITEM.messages, temperature=0.7)  # the line's own temperature wins
    assert [j.samples for j in requests.jobs_for(hot, [0, 1], "m", s)] == [[0, 1]]


def test_an_answers_choices_map_to_the_sample_indexes():
    job = requests.make_job("q", [1, 3], {"n": 2})
    answer = requests.answer_lines(job, {"model": "m", "usage": {"prompt_tokens": 7, "completion_tokens": 5},
                                         "choices": [
        {"index": 1, "message": {"content": "b"}, "finish_reason": "stop", "token_ids": [1, 2]},
        {"index": 0, "message": {"content": "a"}, "finish_reason": "length", "token_ids": [1, 2, 3]}]})
    lines = [json.loads(x) for x in answer.lines.decode().splitlines()]
    assert lines == [
        {"id": "q", "sample": 3, "text": "b", "finish_reason": "stop",
         "usage": {"prompt_tokens": 7, "completion_tokens": 2}, "model": "m"},
        {"id": "q", "sample": 1, "text": "a", "finish_reason": "length",
         "usage": {"prompt_tokens": 7, "completion_tokens": 3}, "model": "m"}]
    assert (answer.samples, answer.output_tokens, answer.missing) == (2, 5, [])
    short = requests.answer_lines(job, {"choices": [{"index": 0, "message": {"content": "a"}}], "usage": {}})
    assert short.samples == 1 and short.missing == [3]


# --- retries ---------------------------------------------------------------------------------------------
def test_the_retry_policy():
    p = RetryPolicy(retries=3, base_s=0.5, cap_s=4)
    assert [p.retryable(s) for s in (None, 500, 502, 503, 429, 408, 400, 401, 404, 422)] == \
        [True] * 6 + [False] * 4
    assert [p.delay(a, rand=lambda: 1.0) for a in range(5)] == [0.5, 1, 2, 4, 4]
    assert [p.delay(a, rand=lambda: 0.0) for a in range(3)] == [0.25, 0.5, 1]
    assert p.delay(0, "7", rand=lambda: 0.0) == 7 and p.delay(0, "600") == 60 and p.delay(0, "soon") <= 0.5


class Scripted:
    """A tiny OpenAI-ish server: each prompt's answers follow its script (statuses, then 200s)."""

    def __init__(self, scripts: dict[str, list]):
        self.scripts, self.bodies = scripts, []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        prompt = body["messages"][0]["content"]
        script = self.scripts.get(prompt, [])
        step = script.pop(0) if script else 200
        if isinstance(step, tuple):
            status, headers = step
        else:
            status, headers = step, {}
        if status == "greedy":
            if body.get("n", 1) > 1:
                return web.json_response({"error": {"message": "n must be 1 when using greedy sampling, got 2."}},
                                         status=400)
            status = 200
        if status != 200:
            return web.json_response({"error": {"message": f"scripted {status}"}}, status=status, headers=headers)
        n = body.get("n", 1)
        return web.json_response({"model": "m", "usage": {"prompt_tokens": 2, "completion_tokens": 4 * n},
                                  "choices": [{"index": i, "message": {"content": f"{prompt}#{i}"},
                                               "finish_reason": "stop"} for i in range(n)]})


async def run_against(scripts: dict[str, list], tmp_path: Path, n: int = 1, retries: int = 2,
                      give_up_after: int | None = None, url: str | None = None, concurrency: int = 4):
    server = Scripted(scripts)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    ids = {p: i for i, p in enumerate(scripts, 1)}
    out = tmp_path / "out.jsonl"
    try:
        with OutputStore.open(out, ids) as store:
            stats = progress.Stats(total=len(ids) * n, done_before=0)
            errors = ErrorLog(errors_path(out))
            jobs = requests.plan((inputs.Item(p, [{"role": "user", "content": p}]) for p in scripts), {}, "m",
                                 requests.Settings(samples=n))
            await Runner(url or f"http://127.0.0.1:{port}", "k", concurrency, store, errors, stats,
                         RetryPolicy(retries, base_s=0.01), give_up_after=give_up_after).run(jobs)
            errors.close()
    finally:
        await runner.cleanup()
    written = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    failed = [json.loads(x) for x in errors.path.read_text().splitlines()] if errors.path.exists() else []
    return stats, written, failed, server


def test_5xx_and_429_are_retried_a_400_is_not(tmp_path):
    stats, written, failed, server = asyncio.run(run_against({
        "ok": [], "flaky": [503, 502], "busy": [(429, {"Retry-After": "0.05"})], "bad": [400, 400],
        "down": [500, 500, 500, 500]}, tmp_path))
    assert sorted((w["id"], w["text"]) for w in written) == [("busy", "busy#0"), ("flaky", "flaky#0"), ("ok", "ok#0")]
    assert sorted((f["id"], f["status"], f["attempts"], f["error"]) for f in failed) == \
        [("bad", 400, 1, "HTTP 400: scripted 400"), ("down", 500, 3, "HTTP 500: scripted 500")]
    assert (stats.written, stats.failed_requests, stats.failed_samples, stats.retries) == (3, 2, 2, 5)
    assert sum(1 for b in server.bodies if b["messages"][0]["content"] == "bad") == 1


def test_n_samples_go_in_one_request_and_a_greedy_refusal_splits_them(tmp_path):
    stats, written, failed, server = asyncio.run(run_against({"a": [], "g": ["greedy", "greedy", "greedy"]},
                                                             tmp_path, n=2))
    assert sorted((w["id"], w["sample"]) for w in written) == [("a", 0), ("a", 1), ("g", 0), ("g", 1)]
    assert not failed and stats.written == 4


def test_a_dead_endpoint_fails_its_requests_after_the_retries_then_stops_the_run(tmp_path):
    from tests.conftest import free_port

    prompts = {f"p{i}": [] for i in range(10)}
    stats, written, failed, _ = asyncio.run(run_against(prompts, tmp_path, retries=1, give_up_after=3,
                                                        url=f"http://127.0.0.1:{free_port()}", concurrency=1))
    assert written == [] and len(failed) == 3 and all(f["status"] is None and f["attempts"] == 2 for f in failed)
    assert stats.aborted and "the last 3 requests all failed" in stats.aborted


# --- progress -----------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_off_a_terminal_progress_is_a_plain_line_every_ten_seconds():
    out, clock = io.StringIO(), FakeClock()
    stats = progress.Stats(total=2000, done_before=200, started=clock.t)
    assert isinstance(progress.progress_for("batch chat", stats, out), progress.PlainProgress)
    p = progress.PlainProgress("batch chat", stats, out, clock=clock)
    p.start()
    stats.written, stats.output_tokens = 100, 5000
    clock.t += 5
    p.update()
    assert out.getvalue() == ""
    clock.t += 5
    p.update()
    assert out.getvalue() == "batch chat  300/2,000 samples  500 tok/s  ETA 2:50\n"
    clock.t += 1
    p.update()
    assert out.getvalue().count("\n") == 1


def test_the_summary_line():
    stats = progress.Stats(total=10, done_before=4, started=0.0)
    stats.written, stats.output_tokens, stats.requests, stats.ended = 4, 400, 4, 2.0
    stats.failed_requests, stats.failed_samples = 1, 2
    assert progress.summary(stats, "out.jsonl") == (
        "wrote 4 samples to out.jsonl (8/10 there now), 2 failed (1 requests); 2.0 s wall, 200 output tok/s, "
        "2.0 requests/s")


def test_bad_input_stops_before_anything_starts(mm_env, tmp_path):
    from click.testing import CliRunner

    from mmlib.cli import main

    bad = write_lines(tmp_path / "in.jsonl", {"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"})
    r = CliRunner().invoke(main, ["batch", "default", str(bad), "-o", str(tmp_path / "out.jsonl")])
    assert r.exit_code == 1 and r.output.strip() == f"mm: {bad}:2: id 1 again (first on line 1) " \
                                                    "(fix: every line needs its own id)"
    assert not (tmp_path / "out.jsonl").exists()
    good = write_lines(tmp_path / "in2.jsonl", {"id": 1, "prompt": "a"})
    r = CliRunner().invoke(main, ["batch", "default", str(good), "-o", str(good)])
    assert r.exit_code == 1 and "that is the input" in r.output
    r = CliRunner().invoke(main, ["batch", "voice", str(good), "-o", str(tmp_path / "out.jsonl")])
    assert r.exit_code == 1 and "voice is a stack" in r.output and "voice-stt" in r.output
    assert not (tmp_path / "out.jsonl").exists()  # a run that wrote nothing leaves no empty file behind
