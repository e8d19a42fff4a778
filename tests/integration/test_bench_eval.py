"""`mm bench --quick` and `mm eval --quick` end to end: real vLLM (CPU) on the embedded model, real
`vllm bench serve`, real lm-eval on mm's offline task; results the summary picks up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def results_dir(live) -> Path:
    return Path(live.env["MM_RESULTS_DIR"])


def result_files(live, kind: str) -> list[Path]:
    return sorted((results_dir(live) / "default").glob(f"*-{kind}*.json"))


def bench_processes(url: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "bench serve" in cmd and url in cmd:
            found.append(p)
    return found


def test_bench_quick_end_to_end(live_mm):
    r = live_mm.mm("bench", "--quick", "--scenario", "latency", "--scenario", "burst", timeout=600)
    assert "latency" in r.stdout and "burst" in r.stdout and "saved" in r.stdout, r.stdout + r.stderr
    [path] = result_files(live_mm, "bench")
    doc = json.loads(path.read_text())
    assert doc["complete"] is True and doc["kind"] == "bench" and doc["mode"] == "quick"
    assert doc["vllm"]["version"] and doc["profile_config"]["served_model_name"] == "smollm2"
    assert doc["server"]["endpoint"] == live_mm.proxy  # measured through mm, so idle sleep and switches see it
    for name in ("latency", "burst"):
        entry = doc["scenarios"][name]
        fig = entry["figures"]
        assert fig["completed"] == entry["params"]["prompts"] and fig["failed"] == 0
        assert fig["mean_ttft_ms"] > 0 and fig["p99_ttft_ms"] >= fig["mean_ttft_ms"] * 0.5
        assert fig["mean_tpot_ms"] > 0 and fig["output_throughput"] > 0 and fig["total_token_throughput"] > 0
        assert fig["max_output_tokens_per_s"] > 0
        assert entry["params"]["scaled_for_cpu"] and entry["memory"]["peak"]["rss_mib"] > 100
    mem = doc["memory"]
    assert mem["peak"]["rss_mib"] > 100 and mem["peak"]["ram_used_mib"] > mem["peak"]["rss_mib"] * 0.5
    if mem["gpu"] == "no GPU":
        assert mem["peak"]["gpu_server_mib"] == "no GPU"
    span = mem["series"]["t"][-1] - mem["series"]["t"][0]
    assert len(mem["series"]["t"]) >= 2 * span  # at least 2 Hz
    summary = (results_dir(live_mm) / "summary.md").read_text()
    assert "## Bench: latency" in summary and "## Bench: burst" in summary and "| default |" in summary
    for png in ("concurrency.png", "memory.png"):
        assert (results_dir(live_mm) / png).stat().st_size > 1000


def test_eval_quick_on_the_local_task(live_mm, monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(Path(live_mm.env["MM_HOME"]) / "hf-datasets"))
    r = live_mm.mm("eval", "--quick", "--tasks", "mm_arith", timeout=300)
    assert "mm_arith" in r.stdout and "exact_match" in r.stdout, r.stdout + r.stderr
    [path] = result_files(live_mm, "eval")
    doc = json.loads(path.read_text())
    task = doc["tasks"]["mm_arith"]
    assert doc["complete"] is True and doc["limit"] == 30 and task["samples"] == 30
    assert task["headline"]["metric"] == "exact_match,last-number" and 0 <= task["headline"]["value"] <= 1
    assert task["filters"][0]["filter"] == "last-number" and "its only filter" in task["headline"]["reason"]
    assert doc["memory"]["peak"]["rss_mib"] > 100
    summary = (results_dir(live_mm) / "summary.md").read_text()
    assert "## Eval" in summary and "mm_arith" in summary and "## Bench: latency" in summary


def offline(live, monkeypatch) -> None:
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(Path(live.env["MM_HOME"]) / "hf-datasets"))
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line


def newest_eval(live) -> dict:
    return json.loads(result_files(live, "eval")[-1].read_text())


def test_eval_gsm8k_format_shows_both_filters_and_explains_the_score(live_mm, monkeypatch):
    """SmolLM2-135M scores near zero on word problems: exactly the score that needs explaining."""
    offline(live_mm, monkeypatch)
    r = live_mm.mm("eval", "default", "--tasks", "mm_gsm8k", "--quick", "--limit", "3", timeout=420)
    out = r.stdout
    assert "flexible-extract (headline)" in out and "strict-match" in out, out + r.stderr
    assert "mm_gsm8k: headline exact_match,flexible-extract: flexible-extract reads the answer" in out
    assert "set-up: chat template, few-shot examples as chat turns, answers up to 1024 tokens" in out
    task = newest_eval(live_mm)["tasks"]["mm_gsm8k"]
    scores = {f["filter"]: f["value"] for f in task["filters"]}
    assert set(scores) == {"strict-match", "flexible-extract"} and task["samples"] == 3
    assert task["generation"]["fewshot_as_multiturn"] is True and task["generation"]["num_fewshot"] == 8
    assert 1 <= len(task["examples"]) <= 5 and all(len(e["answer"]) < 700 for e in task["examples"])
    diag = task["diagnosis"]
    if min(scores.values()) == 0 or scores["strict-match"] < scores["flexible-extract"]:
        assert diag and f"mm_gsm8k: {diag['summary']}" in out and diag["reasons"]
        telling = next((x for x in diag["reasons"] if x["reason"] != "wrong"), diag["reasons"][0])
        assert out.count("  e.g. doc ") == len(telling["examples"]) >= 1
    if scores["strict-match"] < scores["flexible-extract"]:
        assert "strict-match" in diag["summary"] and "vs flexible-extract" in diag["summary"]
        assert any(r["reason"] != "wrong" for r in diag["reasons"]) and out.count("  e.g. doc ") == 2


def test_eval_overrides_are_used_recorded_and_a_cut_is_found(live_mm, monkeypatch):
    offline(live_mm, monkeypatch)
    r = live_mm.mm("eval", "--tasks", "mm_gsm8k", "--limit", "2", "--no-multiturn", "--max-gen-toks", "12",
                   timeout=420)
    doc = newest_eval(live_mm)
    assert doc["settings"]["fewshot_as_multiturn"] is False and doc["settings"]["max_gen_toks"] == 12
    assert doc["settings"]["overrides"] == ["--no-multiturn", "--max-gen-toks 12"]
    task = doc["tasks"]["mm_gsm8k"]
    assert task["generation"]["fewshot_as_multiturn"] is False and task["generation"]["max_gen_toks"] == 12
    cut = next(x for x in task["diagnosis"]["reasons"] if x["reason"] == "truncated")
    assert cut["says"] == "cut at the length limit (12 tokens)" and task["diagnosis"]["tokens"] == "counted"
    assert all(e["tokens"] >= 10 for e in cut["examples"])
    assert "cut at the length limit (12 tokens)" in r.stdout and "changed by --no-multiturn --max-gen-toks 12" in r.stdout


def test_eval_refuses_loglikelihood_tasks(live_mm, monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    r = live_mm.mm("eval", "--tasks", "mm_arith,hellaswag", check=False, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "hellaswag" in r.stderr and "log-likelihoods" in r.stderr and r.stderr.count("\n") == 1


def test_compare_reads_the_results(live_mm, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    out = live_mm.mm("compare", "default", "default").stdout
    assert "TTFT mean at 1 req/s" in out and "mm_arith" in out and "same" in out


def test_ctrl_c_keeps_the_finished_scenarios(live_mm):
    before = set(result_files(live_mm, "bench"))
    env = {**os.environ, **live_mm.env}
    proc = subprocess.Popen([sys.executable, "-m", "mmlib", "bench", "--quick", "--scenario", "burst", "--scenario",
                             "heavy", "--prompts", "4"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, new = time.monotonic() + 120, []
    while time.monotonic() < deadline and not new:  # the file appears once burst has finished
        time.sleep(0.2)
        new = [p for p in set(result_files(live_mm, "bench")) - before if "burst" in p.read_text()]
    assert new, "burst never finished"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "complete" in err, out + err
    doc = json.loads(new[0].read_text())
    assert doc["complete"] is False and list(doc["scenarios"]) == ["burst"]
    url = live_mm.proxy
    time.sleep(0.5)
    assert not bench_processes(url)  # vLLM's bench of the interrupted scenario is gone too
