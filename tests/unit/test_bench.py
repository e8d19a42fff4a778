"""`mm bench`'s logic: scenario plans, vLLM bench argv, its result JSON, a run with a fake runner."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from mmlib import paths
from mmlib.errors import MMError
from mmlib.measure import bench, helper, scenarios
from mmlib.measure.bench import bench_argv, read_vllm_result
from mmlib.measure.helper import Target
from mmlib.measure.scenarios import SCENARIOS, Plan, plan
from mmlib.profiles.profile import load_profile
from tests.unit.test_results import FakeSampler


def test_seed_scenarios():
    assert SCENARIOS["latency"].request_rate == 1.0 and SCENARIOS["latency"].max_concurrency is None
    assert (SCENARIOS["latency"].input_len, SCENARIOS["latency"].output_len) == (256, 256)
    assert (SCENARIOS["burst"].max_concurrency, SCENARIOS["burst"].input_len, SCENARIOS["burst"].output_len) \
        == (50, 128, 256)
    assert (SCENARIOS["heavy"].max_concurrency, SCENARIOS["heavy"].input_len, SCENARIOS["heavy"].output_len) \
        == (100, 512, 512)
    assert SCENARIOS["c10"].max_concurrency == 10  # the seed's "throughput at 10 concurrent"
    assert SCENARIOS["burst"].describe() == "50 concurrent, 128 in / 256 out"


def test_plan_quick_and_full():
    quick = plan([], "quick", cpu=False)
    assert [p.scenario for p in quick] == list(SCENARIOS)
    assert all(p.prompts < f.prompts for p, f in zip(quick, plan([], "full", cpu=False)))
    assert quick[0].warmups == 0 and plan(["heavy"], "full", cpu=False)[0].warmups > 0
    heavy = plan(["heavy"], "quick", cpu=False)[0]
    assert (heavy.prompts, heavy.input_len, heavy.output_len, heavy.max_concurrency) == (100, 512, 512, 100)


def test_plan_scales_quick_down_on_a_cpu_build_only():
    heavy = plan(["heavy"], "quick", cpu=True)[0]
    assert heavy.scaled_for_cpu and heavy.input_len == 512 // scenarios.CPU_QUICK_LENGTH_DIVISOR
    assert heavy.prompts == scenarios.CPU_QUICK_MAX_PROMPTS and heavy.max_concurrency == 100
    full = plan(["heavy"], "full", cpu=True)[0]
    assert not full.scaled_for_cpu and full.input_len == 512


def test_plan_overrides_order_and_unknown_names():
    p = plan(["burst", "latency", "burst"], "quick", cpu=False, prompts=3, input_len=8, output_len=4)
    assert [x.scenario for x in p] == ["burst", "latency"]
    assert all((x.prompts, x.input_len, x.output_len) == (3, 8, 4) for x in p)
    with pytest.raises(MMError, match="unknown scenario 'warp'.*latency, c10, burst, heavy"):
        plan(["warp"], "quick", cpu=False)


TARGET = Target(url="http://127.0.0.1:9999", served_model_name="smollm2", tokenizer="/models/smol", env={})


def test_bench_argv(tmp_path):
    argv = bench_argv(plan(["burst"], "full", cpu=False)[0], TARGET, tmp_path, "burst.json", python="py")
    assert argv[:5] == ["py", "-m", "vllm.entrypoints.cli.main", "bench", "serve"]
    joined = " ".join(argv)
    for part in ("--base-url http://127.0.0.1:9999", "--model smollm2", "--tokenizer /models/smol",
                 "--dataset-name random", "--random-input-len 128", "--random-output-len 256", "--ignore-eos",
                 "--num-prompts 500", "--max-concurrency 50", "--request-rate inf", "--save-result",
                 f"--result-dir {tmp_path}", "--result-filename burst.json", "--num-warmups 2",
                 "--backend vllm", "--endpoint /v1/completions"):
        assert part in joined
    latency = " ".join(bench_argv(plan(["latency"], "quick", cpu=False)[0], TARGET, tmp_path, "l.json"))
    assert "--request-rate 1 " in latency and "--max-concurrency" not in latency and "--num-warmups" not in latency


def vllm_result(tmp_path, **over):
    raw = {"date": "20260101-000000", "backend": "vllm", "num_prompts": 4, "completed": 3, "failed": 1,
           "duration": 2.5, "output_throughput": 120.5, "max_output_tokens_per_s": 150.0,
           "total_token_throughput": 240.0, "mean_ttft_ms": 80.0, "p99_ttft_ms": 120.0, "mean_tpot_ms": 30.0,
           "request_goodput": None, "ttfts": [0.1, 0.2], "generated_texts": ["x" * 1000],
           "errors": ["", "Traceback ...\nConnectionError: refused", "", "Traceback ...\nConnectionError: refused"],
           **over}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(raw))
    return path


def test_read_vllm_result_keeps_figures_and_distinct_errors(tmp_path):
    out = read_vllm_result(vllm_result(tmp_path, p99_tpot_ms=float("nan")))
    assert out["figures"] == {"completed": 3, "failed": 1, "duration": 2.5, "output_throughput": 120.5,
                              "max_output_tokens_per_s": 150.0, "total_token_throughput": 240.0,
                              "mean_ttft_ms": 80.0, "p99_ttft_ms": 120.0, "mean_tpot_ms": 30.0}
    assert out["errors"] == ["Traceback ...\nConnectionError: refused"]


def test_read_vllm_result_missing(tmp_path):
    with pytest.raises(MMError, match="no readable result"):
        read_vllm_result(tmp_path / "nothing.json")


def test_run_helper_reports_the_last_line(tmp_path):
    log = tmp_path / "log"
    with pytest.raises(MMError, match=r"the thing failed \(exit 3\).*: boom at the end"):
        helper.run_helper([sys.executable, "-c", "import sys; print('starting'); print('boom at the end'); "
                          "sys.exit(3)"], {}, log, what="the thing")
    assert "starting" in log.read_text()


def test_run_helper_ticks_and_ctrl_c_ends_the_helper(tmp_path):
    ticks = []

    def tick():
        ticks.append(time.monotonic())
        if len(ticks) == 2:
            raise KeyboardInterrupt
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(KeyboardInterrupt):
        helper.run_helper([sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path / "log", tick)
    assert len(ticks) == 2
    time.sleep(0.2)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left


def test_finished_requests_reads_vllm_counter(monkeypatch):
    import httpx

    text = ('# HELP vllm:request_success_total x\nvllm:request_success_total{finished_reason="length"} 12.0\n'
            'vllm:request_success_total{finished_reason="stop"} 3.0\nvllm:other 9\n')
    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(200, text=text))
    assert helper.finished_requests("http://x") == 15.0
    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(200, text="nothing here"))
    assert helper.finished_requests("http://x") is None

    def down(*a, **k):
        raise httpx.ConnectError("refused")
    monkeypatch.setattr(httpx, "get", down)
    assert helper.finished_requests("http://x") is None


def test_tokenizer_path_of_a_relative_model(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "PROJECT_ROOT", tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert helper.tokenizer_path("models/m") == str(tmp_path / "models" / "m")
    assert helper.tokenizer_path("Qwen/Qwen2.5-7B-Instruct-AWQ") == "Qwen/Qwen2.5-7B-Instruct-AWQ"


SERVER = {"profile": "default", "url": "http://127.0.0.1:9", "endpoint": "http://127.0.0.1:9", "pid": None, "served_model_name": "smollm2",
          "model": "embedded:SmolLM2-135M-Instruct", "state": "awake"}


def fake_runner(calls, fail_on=None):
    def run(p: Plan, target, workdir, log, on_progress):
        calls.append(p.scenario)
        if p.scenario == fail_on:
            raise fail_on_exc[fail_on]
        on_progress(p.prompts)
        return {"figures": {"completed": p.prompts, "failed": 0, "output_throughput": 10.0 * p.prompts,
                            "mean_ttft_ms": 50.0}}
    return run


fail_on_exc = {"burst": KeyboardInterrupt(), "heavy": MMError("vLLM's bench (heavy) failed (exit 1)")}


class RecordingUI:
    def __init__(self):
        self.events = []

    def begin(self, name, total):
        self.events.append(("begin", name, total))

    def advance(self, done):
        self.events.append(("advance", done))

    def end(self, name, entry):
        self.events.append(("end", name, entry["complete"]))


def test_run_writes_result_and_summary(mm_env, tmp_path):
    calls, ui = [], RecordingUI()
    plans = plan(["latency", "burst"], "quick", cpu=True)
    path, doc = bench.run(load_profile("default"), SERVER, plans, "quick", ui=ui, root=tmp_path,
                          runner=fake_runner(calls), sampler=FakeSampler())
    assert calls == ["latency", "burst"]
    saved = json.loads(path.read_text())
    assert path.parent == tmp_path / "default" and saved["complete"] is True and saved["kind"] == "bench"
    assert saved["profile_config"]["memory"]["sequences"] == 32 and saved["gpu"]
    assert saved["vllm"]["version"] and saved["server"]["served_model_name"] == "smollm2"
    assert saved["scenarios"]["burst"]["params"]["max_concurrency"] == 50
    assert saved["scenarios"]["latency"]["figures"]["completed"] == min(10, scenarios.CPU_QUICK_MAX_PROMPTS)
    assert saved["memory"]["peak"]["rss_mib"] == 1000.0 and saved["finished_at"]
    assert ("begin", "latency", min(10, scenarios.CPU_QUICK_MAX_PROMPTS)) in ui.events and ("end", "burst", True) in ui.events
    assert "## Bench: burst" in (tmp_path / "summary.md").read_text()


def test_ctrl_c_keeps_finished_scenarios(mm_env, tmp_path):
    calls = []
    file = bench_result_file(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        bench.run(load_profile("default"), SERVER, plan(["latency", "burst", "heavy"], "quick", cpu=True), "quick",
                  root=tmp_path, runner=fake_runner(calls, fail_on="burst"), sampler=FakeSampler(), file=file)
    saved = json.loads(file.path.read_text())
    assert calls == ["latency", "burst"] and list(saved["scenarios"]) == ["latency"]
    assert saved["complete"] is False and "## Bench: latency" in (tmp_path / "summary.md").read_text()
    assert "incomplete" in (tmp_path / "summary.md").read_text()


def test_a_failing_scenario_is_recorded(mm_env, tmp_path):
    file = bench_result_file(tmp_path)
    with pytest.raises(MMError, match="heavy"):
        bench.run(load_profile("default"), SERVER, plan(["latency", "heavy"], "quick", cpu=True), "quick",
                  root=tmp_path, runner=fake_runner([], fail_on="heavy"), sampler=FakeSampler(), file=file)
    saved = json.loads(file.path.read_text())
    assert saved["complete"] is False and "heavy" in saved["error"] and list(saved["scenarios"]) == ["latency"]


def bench_result_file(root):
    from mmlib.measure.results import ResultFile

    return ResultFile("default", "bench", root=root)


def test_cli_import_stays_light():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mmlib.cli"], capture_output=True,
                         text=True, check=True, cwd=paths.PROJECT_ROOT).stderr
    heavy = [line for line in out.splitlines()
             if any(f" {m}" in line.split("|")[-1] for m in ("vllm", "torch", "lm_eval", "matplotlib", "pynvml",
                                                             "transformers"))]
    assert not heavy


def test_bench_refuses_a_stack(mm_env):
    from click.testing import CliRunner

    from mmlib.cli import main

    r = CliRunner().invoke(main, ["bench", "voice", "--quick"])
    assert r.exit_code == 1 and "voice is a stack" in r.output and "voice-stt" in r.output
    r = CliRunner().invoke(main, ["bench", "default", "--scenario", "warp"])
    assert r.exit_code == 2 and "warp" in r.output


def tracked_results_repo(tmp_path):
    """A git repository holding what this checkout tracks under benchmark_results/, and its .gitignore."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=mm", "-c", "user.email=mm@localhost", "-c", "commit.gpgsign=false"]
    listed = subprocess.run(["git", "ls-files", "-z", "benchmark_results", ".gitignore"], cwd=paths.PROJECT_ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    repo = tmp_path / "repo"
    for name in filter(None, listed.stdout.split("\0")):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(paths.PROJECT_ROOT / name, repo / name)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "runs of record"]):
        subprocess.run(git + args, cwd=repo, check=True, capture_output=True)
    return repo


def test_a_bench_run_changes_no_tracked_file(mm_env, tmp_path, monkeypatch):
    """Issue 22: a run lands beside the runs of record where git ignores it, and the summary it
    regenerates is not the tracked one: after `mm bench`, git sees nothing changed or new."""
    repo = tracked_results_repo(tmp_path)
    monkeypatch.delenv("MM_RESULTS_DIR")
    monkeypatch.setattr(paths, "PROJECT_ROOT", repo)
    path, _ = bench.run(load_profile("default"), SERVER, plan(["latency"], "quick", cpu=True), "quick",
                        runner=fake_runner([]), sampler=FakeSampler())
    assert path.is_relative_to(repo / "benchmark_results") and (path.parent.parent / "summary.md").is_file()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout
    assert status == ""
