"""`mm bench --sweep`'s logic: the levels' plans, the knee, where TTFT climbs, the plot, and the best
concurrency remembered for `mm batch` (keyed by profile, model, vLLM and card)."""
from __future__ import annotations

import json

import pytest

from mmlib import paths
from mmlib.errors import MMError
from mmlib.measure import sweep
from mmlib.measure.scenarios import CPU_QUICK_LENGTH_DIVISOR, Plan
from mmlib.measure.sweep import Point, knee, level_plans, parse_levels, ttft_climb
from mmlib.profiles.profile import load_profile
from tests.unit.test_bench import SERVER, RecordingUI
from tests.unit.test_memory import FakeProbe
from tests.unit.test_results import FakeSampler

CARD = {"card": "Fake GPU", "card_mib": 8000}


def point(c: int, tok_s: float | None, ttft: float | None = 50.0) -> Point:
    return Point(c, 4 * c, tok_s, None if tok_s is None else tok_s / 100, ttft, None if ttft is None else 2 * ttft,
                 10.0, 9.0, 0)


# --- plans ----------------------------------------------------------------------------------------------
def test_parse_levels():
    assert parse_levels("16, 1,4,4") == (1, 4, 16)
    for bad in ("", "1,x", "0,4", "-1", ",,"):
        with pytest.raises(MMError, match=r"--levels .*not a list of concurrencies \(fix: .*--levels 1,4,16,64\)"):
            parse_levels(bad)


def test_full_levels_keep_enough_prompts_in_flight():
    plans = level_plans(sweep.LEVELS, "full", cpu=False)
    assert [p.scenario for p in plans] == [f"c{c}" for c in sweep.LEVELS]
    assert [p.max_concurrency for p in plans] == list(sweep.LEVELS)
    assert [p.prompts for p in plans] == [32, 32, 32, 32, 64, 128, 256, 512, 1024]
    assert all((p.input_len, p.output_len, p.request_rate, p.warmups) == (256, 256, None, 2) for p in plans)
    assert not any(p.scaled_for_cpu for p in plans)
    assert level_plans((4096,), "full", cpu=True)[0].prompts == sweep.FULL_MAX_PROMPTS  # full is never scaled


def test_quick_levels_are_short_and_cpu_scaled():
    quick = level_plans(sweep.QUICK_LEVELS, "quick", cpu=False)
    assert [p.prompts for p in quick] == [8, 8, 32, 128, 512]
    assert all((p.input_len, p.output_len, p.warmups) == (128, 64, 0) for p in quick)
    cpu = level_plans((1, 4, 16), "quick", cpu=True)
    assert [p.prompts for p in cpu] == [8, 8, 16]  # at most 8, but never fewer than the level
    assert all(p.scaled_for_cpu and p.output_len == 64 // CPU_QUICK_LENGTH_DIVISOR for p in cpu)
    shortened = level_plans((4, 1), "quick", cpu=True, prompts=3, input_len=5, output_len=2)
    assert [(p.max_concurrency, p.prompts, p.input_len, p.output_len) for p in shortened] == [(1, 3, 5, 2), (4, 3, 5, 2)]


# --- the knee -------------------------------------------------------------------------------------------
def test_knee_is_the_lowest_level_within_95_percent_of_the_best():
    curve = [point(1, 100), point(2, 190), point(4, 350), point(8, 600), point(16, 960), point(32, 1000),
             point(64, 990)]
    assert knee(curve).concurrency == 16  # 960 >= 0.95 * 1000
    assert knee(curve, share=1.0).concurrency == 32
    assert knee([point(1, 100), point(4, 94.9), point(16, 80)]).concurrency == 1  # the best is the first level
    assert knee([point(1, None), point(4, 0.0)]) is None
    assert knee([point(1, None), point(4, 50.0), point(16, 49.0)]).concurrency == 4  # failed levels don't count


def test_ttft_climb_is_the_first_level_past_twice_the_lowest():
    curve = [point(1, 100, 40), point(4, 300, 60), point(16, 900, 79), point(64, 950, 81), point(256, 950, 900)]
    assert ttft_climb(curve).concurrency == 64
    assert ttft_climb(curve[:3]) is None and ttft_climb(curve[:1]) is None
    assert ttft_climb([point(1, 100, None), point(4, 300, 60), point(16, 900, 200)]).concurrency == 16


def level(c: int, tok_s: float | None, ttft: float = 50.0, failed: int = 0) -> dict:
    fig = {"completed": 4 * c, "failed": failed, "request_throughput": (tok_s or 0) / 64, "median_ttft_ms": ttft,
           "p99_ttft_ms": ttft * 3, "median_tpot_ms": 12.5, "median_itl_ms": 12.0}
    if tok_s is not None:
        fig["output_throughput"] = tok_s
    return {"params": Plan(f"c{c}", 4 * c, 256, 256, None, c, 2).params(), "figures": fig}


def sweep_doc(profile: str = "chat") -> dict:
    return {"kind": "sweep", "profile": profile, "mode": "full", "gpu": "Fake GPU", "levels": {
        "c1": level(1, 240, 36), "c4": level(4, 900, 40), "c16": level(16, 2900, 60), "c64": level(64, 3000, 400),
        "c256": level(256, 2990, 2100)}}


def test_analyse_and_describe():
    found = sweep.analyse(sweep_doc())
    assert found["concurrency"] == 16 and found["output_throughput"] == 2900
    assert (found["best_concurrency"], found["best_output_throughput"]) == (64, 3000)
    assert found["ttft_climbs_at"] == 64 and found["lowest_level_ttft_p50_ms"] == 36
    assert found["share"] == 0.95 and "lowest concurrency" in found["definition"]
    line = sweep.describe(found)
    assert line.startswith("knee: c=16, the lowest concurrency reaching 95% of the best output throughput")
    assert "(2900 of 3000 tok/s, best at c=64)" in line and "climbs past 2x the lowest level's (36 ms) from c=64" in line
    assert sweep.describe(sweep.analyse({"levels": {"c1": level(1, None)}})).startswith("knee: none")


def test_point_line_is_the_result_files_format():
    [first, *_] = sweep.points(sweep_doc())
    assert first.line() == ("sweep c=1 out_tok_s=240.0 req_s=3.75 ttft_p50_ms=36.0 ttft_p99_ms=108.0 "
                            "tpot_p50_ms=12.50 itl_p50_ms=12.00 failed=0")
    assert Point(8, 32, None, None, None, None, None, None, None).line().count("n/a") == 7


def test_the_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    doc = sweep_doc()
    doc["levels"]["c4"]["figures"].pop("output_throughput")  # a level without a figure still draws
    path = sweep.write_plot(doc, tmp_path / "sweep.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]  # no temp file left beside it


# --- remembered -----------------------------------------------------------------------------------------
def test_setup_changes_with_model_vllm_card_and_settings(mm_env):
    chat = load_profile("chat")
    setup = sweep.setup_of(chat, {"model": "Qwen/Qwen2.5-7B-Instruct-AWQ"}, CARD)
    assert setup["profile"] == "chat" and setup["model"] == "Qwen/Qwen2.5-7B-Instruct-AWQ" and setup["vllm"]
    assert (setup["card"], setup["card_mib"]) == ("Fake GPU", 8000)
    assert sweep.card_of(FakeProbe()) == CARD and sweep.card_of(FakeProbe(available=False)) == {"card": "none",
                                                                                                   "card_mib": 0}
    import dataclasses

    more_seqs = dataclasses.replace(chat, memory=dataclasses.replace(chat.memory, sequences=32))
    assert sweep.setup_of(more_seqs, {"model": setup["model"]}, CARD)["settings"] != setup["settings"]
    assert sweep.setup_of(chat, {}, CARD)["model"] == chat.model  # the profile's model when the snapshot has none


def test_remember_and_recall_by_setup(mm_env):
    setup = {"profile": "chat", "model": "m", "vllm": "0.26.0", **CARD, "settings": "abc"}
    assert sweep.recall(setup) is None
    sweep.remember(setup, 16, "`mm bench chat --sweep`", paths.PROJECT_ROOT / "r.json",
                   {"output_throughput": 2900.0, "best_output_throughput": 3000.0}, now=1.8e9)
    entry = sweep.recall(setup)
    assert entry["concurrency"] == 16 and entry["source"] == "`mm bench chat --sweep`"
    assert entry["measured_at"].startswith("2027-01-15") and entry["output_throughput"] == 2900.0
    for changed in ({"vllm": "0.27.0"}, {"card": "NVIDIA H200"}, {"card_mib": 12288}, {"model": "other"},
                    {"settings": "def"}, {"profile": "perf"}):
        assert sweep.recall({**setup, **changed}) is None, changed  # a changed setup sweeps again
    sweep.remember({**setup, "vllm": "0.27.0"}, 32, "a short sweep (`mm batch`)", None)
    assert sweep.recall(setup)["concurrency"] == 16 and sweep.recall({**setup, "vllm": "0.27.0"})["concurrency"] == 32
    store = paths.best_concurrency_file()
    assert store.stat().st_mode & 0o777 == 0o600 and len(json.loads(store.read_text())["setups"]) == 2


def test_a_broken_store_is_no_memory_and_is_rewritten(mm_env):
    setup = {"profile": "chat", "model": "m", "vllm": "1", **CARD, "settings": "abc"}
    store = paths.best_concurrency_file()
    store.write_text("{not json")
    assert sweep.recall(setup) is None
    sweep.remember(setup, 8, "x", None)
    assert sweep.recall(setup)["concurrency"] == 8
    store.write_text(json.dumps({"setups": {sweep.setup_key(setup): {"concurrency": "many", "setup": setup}}}))
    assert sweep.recall(setup) is None


def test_the_store_keeps_the_newest_setups(mm_env):
    for i in range(sweep.STORE_MAX_SETUPS + 3):
        sweep.remember({"profile": f"p{i}"}, 4, "x", None, now=1.7e9 + i)
    kept = json.loads(paths.best_concurrency_file().read_text())["setups"]
    assert len(kept) == sweep.STORE_MAX_SETUPS and sweep.recall({"profile": "p0"}) is None
    assert sweep.recall({"profile": f"p{sweep.STORE_MAX_SETUPS + 2}"})["concurrency"] == 4


# --- a whole sweep, with a fake runner ------------------------------------------------------------------
def curve_runner(calls: list, limit: int = 4):
    """Throughput grows with concurrency up to `limit` requests at once, then levels off."""
    def run(p: Plan, target, workdir, log, on_progress):
        calls.append(p.scenario)
        on_progress(p.prompts)
        c = p.max_concurrency
        return {"figures": {"completed": p.prompts, "failed": 0, "output_throughput": 100.0 * min(c, limit),
                            "request_throughput": float(min(c, limit)), "median_ttft_ms": 20.0 * max(1, c / limit),
                            "p99_ttft_ms": 30.0 * max(1, c / limit), "median_tpot_ms": 10.0, "median_itl_ms": 10.0}}
    return run


def test_run_saves_the_knee_the_plot_and_remembers_it(mm_env, tmp_path):
    pytest.importorskip("matplotlib")
    calls, ui = [], RecordingUI()
    profile = load_profile("default")
    plans = level_plans((1, 4, 16), "quick", cpu=True)
    path, doc = sweep.run(profile, SERVER, plans, "quick", ui=ui, root=tmp_path, runner=curve_runner(calls),
                          sampler=FakeSampler(), card=CARD)
    assert calls == ["c1", "c4", "c16"] and ("end", "c16", True) in ui.events
    saved = json.loads(path.read_text())
    assert path.parent == tmp_path / "default" and path.name.endswith("-sweep.json")
    assert saved["kind"] == "sweep" and saved["complete"] is True and list(saved["levels"]) == calls
    assert saved["knee"]["concurrency"] == 4 and saved["knee"]["ttft_climbs_at"] == 16
    assert saved["plot"] == path.with_suffix(".png").name and path.with_suffix(".png").stat().st_size > 10_000
    assert not (tmp_path / "summary.md").exists()  # a sweep is not a bench: summary.md is left alone
    entry = sweep.recall(sweep.setup_of(profile, SERVER, CARD))
    assert entry["concurrency"] == 4 and entry["source"] == "`mm bench default --sweep`" and entry["result"] == str(path)


def test_an_interrupted_sweep_keeps_its_levels_and_remembers_nothing(mm_env, tmp_path):
    calls = []
    inner = curve_runner(calls)

    def runner(p, *a):
        if p.scenario == "c4":
            raise KeyboardInterrupt
        return inner(p, *a)
    from mmlib.measure.results import ResultFile

    file = ResultFile("default", "sweep", root=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(load_profile("default"), SERVER, level_plans((1, 2, 4), "quick", cpu=True), "quick", root=tmp_path,
                  runner=runner, sampler=FakeSampler(), file=file, card=CARD)
    saved = json.loads(file.path.read_text())
    assert saved["complete"] is False and list(saved["levels"]) == ["c1", "c2"]
    assert not paths.best_concurrency_file().exists()


def test_best_concurrency_remembered_default_or_a_short_sweep(mm_env, tmp_path, monkeypatch):
    profile = load_profile("default")
    monkeypatch.setattr(sweep, "card_of", lambda probe=None: CARD)
    monkeypatch.setattr(sweep, "write_plot", lambda doc, path: path.write_bytes(b"png") and path)  # drawn elsewhere
    assert sweep.best_concurrency(profile, SERVER, quick_sweep=False) == (
        sweep.DEFAULT_CONCURRENCY, "mm's default (no sweep measured for this setup yet; "
                                   "`mm bench default --sweep` measures one)")
    calls = []
    class Levels:  # sweep.run's runner when none is given: one that closes
        def __init__(self):
            self.run, self.closed = curve_runner(calls, limit=16), False

        def __call__(self, *a):
            return self.run(*a)

        def close(self):
            closed.append(True)
    closed = []
    monkeypatch.setattr(sweep, "LevelRunner", Levels)
    concurrency, where = sweep.best_concurrency(profile, SERVER)
    assert calls == [f"c{c}" for c in sweep.QUICK_LEVELS] and concurrency == 16 and closed == [True]
    assert where.startswith("a short sweep just now (levels 1,4,16,64,256, ") and "-sweep.json" in where
    assert sweep.best_concurrency(profile, SERVER) == (16, f"measured by a short sweep (`mm batch`) on "
                                                           f"{sweep.recall(sweep.setup_of(profile, SERVER))['measured_at'][:10]}")
    assert len(calls) == len(sweep.QUICK_LEVELS)  # remembered: no second sweep


def test_bench_sweep_flags_are_checked_before_anything_starts(mm_env):
    from click.testing import CliRunner

    from mmlib.cli import main

    r = CliRunner().invoke(main, ["bench", "default", "--sweep", "--scenario", "latency"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--sweep measures its own levels" in r.output
    r = CliRunner().invoke(main, ["bench", "default", "--levels", "1,4"])
    assert r.exit_code == 1 and "--levels is for --sweep (fix: add --sweep)" in r.output
    r = CliRunner().invoke(main, ["bench", "default", "--sweep", "--levels", "1,four"])
    assert r.exit_code == 1 and "--levels '1,four': not a list of concurrencies" in r.output
    assert "Traceback" not in r.output


# --- the kept helper (one vLLM import for every level) ---------------------------------------------------
JOBS = """
import json, os, sys
for line in sys.stdin:
    job = json.loads(line)
    print("job", job["n"], os.getpid(), flush=True)
    if job["n"] == 3:
        sys.exit(7)
    with open(job["done"] + ".tmp", "w") as f:
        f.write("0" if job["n"] == 1 else "ValueError: no such dataset")
    os.replace(job["done"] + ".tmp", job["done"])
"""


def test_kept_helper_runs_jobs_in_one_process_and_reports_how_each_ended(tmp_path):
    import sys

    from mmlib.measure.helper import KeptHelper

    log = tmp_path / "log"
    helper = KeptHelper([sys.executable, "-c", JOBS], {}, log, what="the jobs")
    ticks = []
    assert helper.run({"n": 1, "done": str(tmp_path / "1.done")}, tmp_path / "1.done", lambda: ticks.append(1)) == "0"
    assert helper.run({"n": 2, "done": str(tmp_path / "2.done")}, tmp_path / "2.done") == "ValueError: no such dataset"
    with pytest.raises(MMError, match=r"the jobs ended \(exit 7\); see .*log: job 3"):
        helper.run({"n": 3, "done": str(tmp_path / "3.done")}, tmp_path / "3.done")
    pids = {line.split()[2] for line in log.read_text().splitlines() if line.startswith("job")}
    assert len(pids) == 1  # one process did every job
    helper.close()


def test_kept_helper_ends_its_group_on_ctrl_c(tmp_path):
    import sys
    import time

    import psutil

    from mmlib.measure.helper import KeptHelper

    helper = KeptHelper([sys.executable, "-c", "import time, sys; sys.stdin.readline(); time.sleep(60)"], {},
                        tmp_path / "log")

    def tick():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        helper.run({"n": 1}, tmp_path / "never.done", tick)
    time.sleep(0.2)
    assert helper.proc.poll() is not None or psutil.Process(helper.proc.pid).status() == psutil.STATUS_ZOMBIE


def test_level_runner_drives_the_bench_levels_helper(tmp_path, monkeypatch):
    """bench_levels.py against the fake vLLM's `bench serve` (no server: every request fails, counted)."""
    from pathlib import Path

    from mmlib.measure.helper import Target

    fake = Path(__file__).resolve().parents[1] / "faults" / "fakevllm"
    target = Target(url="http://127.0.0.1:9", served_model_name="m", tokenizer="t",
                    env={"PYTHONPATH": f"{fake}:{paths.PROJECT_ROOT}", "PATH": "/usr/bin:/bin"})
    runner = sweep.LevelRunner()
    try:
        out = [runner(p, target, tmp_path, tmp_path / "log") for p in level_plans((1, 2), "quick", cpu=True, prompts=2)]
    finally:
        runner.close()
    assert [o["figures"]["failed"] for o in out] == [2, 2] and [o["figures"]["completed"] for o in out] == [0, 0]
    assert out[0]["errors"] and "ConnectError" in out[0]["errors"][0]
    assert (tmp_path / "log").read_text().count("# mm: ") == 1  # one helper started, for both levels
