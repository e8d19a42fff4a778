"""Result files (atomic, never overwritten), summary.md, plots and `mm compare`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmlib.errors import MMError
from mmlib.measure import results
from mmlib.measure.results import (
    Recorder,
    ResultFile,
    compare_rows,
    load_results,
    summary_markdown,
)


class FakeSampler:
    """Stands in for MemorySampler: a clock that moves 1 s per read, fixed figures."""

    def __init__(self, gpu=None):
        from tests.unit.test_memory import FakeProbe

        self.t, self.stopped, self.gpu = 0.0, False, gpu
        self.probe = FakeProbe(available=bool(gpu))

    def now(self):
        self.t += 1.0
        return self.t

    def stats(self, t0=None, t1=None):
        return {"samples": 4, "peak": {"gpu_server_mib": self.gpu or "no GPU", "rss_mib": 900.0},
                "mean": {"rss_mib": 850.0}}

    def result(self):
        g = self.gpu or "no GPU"
        return {"gpu": "Fake GPU" if self.gpu else "no GPU", "samples": 8,
                "peak": {"gpu_server_mib": g, "gpu_device_mib": g, "rss_mib": 1000.0, "ram_used_mib": 5000.0},
                "mean": {"gpu_server_mib": g, "gpu_device_mib": g, "rss_mib": 950.0, "ram_used_mib": 4000.0},
                "series": {"t": [0, 1, 2], "gpu_server_mib": [1, 2, 3] if self.gpu else g,
                           "gpu_device_mib": [2, 3, 4] if self.gpu else g, "rss_mib": [900.0, 1000.0, 950.0],
                           "ram_used_mib": [4000.0, 5000.0, 3000.0]}}

    def stop(self):
        self.stopped = True


def test_result_file_is_created_once_then_replaced(tmp_path):
    f = ResultFile("p", "bench", root=tmp_path, now=0)
    first = f.save({"a": 1})
    assert first.parent == tmp_path / "p" and first.name.endswith("-bench.json")
    assert f.save({"a": 2}) == first and json.loads(first.read_text()) == {"a": 2}
    assert [p.name for p in (tmp_path / "p").iterdir()] == [first.name]  # no temp files left behind


def test_result_file_never_overwrites_another_run(tmp_path):
    a = ResultFile("p", "bench", root=tmp_path, now=0).save({"run": "a"})
    b = ResultFile("p", "bench", root=tmp_path, now=0).save({"run": "b"})
    c = ResultFile("p", "bench", root=tmp_path, now=0).save({"run": "c"})
    assert a != b != c and b.name.endswith("-bench-2.json") and c.name.endswith("-bench-3.json")
    assert json.loads(a.read_text()) == {"run": "a"}


def test_result_file_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError("no hard links here")
    monkeypatch.setattr(os, "link", no_link)
    a = ResultFile("p", "eval", root=tmp_path, now=0).save({"run": "a"})
    b = ResultFile("p", "eval", root=tmp_path, now=0).save({"run": "b"})
    assert a != b and json.loads(a.read_text()) == {"run": "a"} and json.loads(b.read_text()) == {"run": "b"}
    assert len(list((tmp_path / "p").iterdir())) == 2


def test_recorder_keeps_finished_steps_when_interrupted(tmp_path):
    doc = {"kind": "bench", "profile": "p", "complete": False}
    sampler = FakeSampler()
    rec = Recorder(doc, "scenarios", ResultFile("p", "bench", root=tmp_path), sampler)
    rec.step("one", {"prompts": 3}, lambda: {"figures": {"completed": 3}})
    saved = json.loads(rec.file.path.read_text())
    assert saved["scenarios"]["one"]["complete"] and saved["complete"] is False  # saved after each step

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        rec.step("two", {}, interrupted)
    rec.finish(False)
    saved = json.loads(rec.file.path.read_text())
    assert list(saved["scenarios"]) == ["one"] and saved["complete"] is False and sampler.stopped
    assert saved["scenarios"]["one"]["memory"]["peak"]["rss_mib"] == 900.0
    assert saved["memory"]["peak"]["gpu_server_mib"] == "no GPU"


def bench_doc(profile, stamp, ttft, tput, gpu=None, scenarios=("latency", "c10", "burst", "heavy"), mode="quick"):
    sampler = FakeSampler(gpu)
    conc = {"latency": None, "c10": 10, "burst": 50, "heavy": 100}
    return {"schema": 1, "kind": "bench", "profile": profile, "mode": mode, "complete": True,
            "started_at": stamp, "gpu": "Fake GPU" if gpu else "none", "vllm": {"version": "0.26.0"},
            "scenarios": {s: {"params": {"scenario": s, "prompts": 10, "input_len": 256, "output_len": 256,
                                         "request_rate": None if conc[s] else 1.0, "max_concurrency": conc[s]},
                              "figures": {"mean_ttft_ms": ttft * (i + 1), "p99_ttft_ms": ttft * (i + 2),
                                          "mean_tpot_ms": 20.0, "output_throughput": tput * (i + 1),
                                          "max_output_tokens_per_s": tput * (i + 2),
                                          "total_token_throughput": tput * 2, "failed": 0,
                                          "max_concurrent_requests": 3},
                              "memory": sampler.stats(), "t_start": i, "t_end": i + 1}
                          for i, s in enumerate(scenarios)},
            "memory": sampler.result()}


def eval_doc(profile, stamp, score):
    return {"schema": 1, "kind": "eval", "profile": profile, "mode": "quick", "complete": True, "started_at": stamp,
            "gpu": "none", "limit": 30, "memory": FakeSampler().result(),
            "tasks": {"mm_arith": {"primary": {"metric": "exact_match,last-number", "value": score, "stderr": 0.05},
                                   "samples": 30}}}


def write(root: Path, doc: dict, name: str) -> None:
    (root / doc["profile"]).mkdir(parents=True, exist_ok=True)
    (root / doc["profile"] / name).write_text(json.dumps(doc))


@pytest.fixture
def filled(tmp_path):
    write(tmp_path, bench_doc("baseline", "2026-01-01T10:00:00", 100.0, 500.0, gpu=9000.0),
          "20260101-100000-bench.json")
    write(tmp_path, bench_doc("perf", "2026-01-01T09:00:00", 90.0, 700.0, gpu=9500.0), "20260101-090000-bench.json")
    write(tmp_path, bench_doc("perf", "2026-01-01T11:00:00", 50.0, 1000.0, gpu=10200.0, scenarios=("latency",)),
          "20260101-110000-bench.json")
    write(tmp_path, eval_doc("perf", "2026-01-01T12:00:00", 0.8), "20260101-120000-eval.json")
    write(tmp_path, eval_doc("baseline", "2026-01-01T12:00:00", 0.7), "20260101-120000-eval.json")
    (tmp_path / "perf" / "broken.json").write_text("{not json")
    (tmp_path / "perf" / "other.json").write_text(json.dumps({"something": "else"}))
    return tmp_path


def test_load_results_skips_what_is_not_a_result(filled):
    found = load_results(filled)
    assert len(found) == 5 and all(d["_path"].endswith(("-bench.json", "-eval.json")) for d in found)
    assert results.latest(found, "perf", "bench")["_path"] == "perf/20260101-110000-bench.json"
    assert results.latest(found, "perf", "bench", has="c10")["_path"] == "perf/20260101-090000-bench.json"
    assert results.latest(found, "nobody", "bench") is None


def test_summary_has_a_table_per_scenario_across_profiles(filled):
    text = summary_markdown(load_results(filled), plots=["concurrency.png"])
    for name in ("latency", "c10", "burst", "heavy"):
        assert f"## Bench: {name} (" in text
    latency = text.split("## Bench: latency")[1].split("## Bench: c10")[0]
    assert "| baseline |" in latency and "| perf | 20260101-110000-bench (quick)" in latency
    assert "| 50.0 |" in latency  # perf's newest latency TTFT
    c10 = text.split("## Bench: c10")[1].split("## Bench: burst")[0]
    assert "20260101-090000-bench" in c10  # the newest run that has c10
    assert "## Eval" in text and "exact_match,last-number" in text and "0.800 ± 0.050" in text
    assert "## Memory" in text and "![concurrency](concurrency.png)" in text


def test_summary_says_no_gpu(tmp_path):
    write(tmp_path, bench_doc("default", "2026-01-01T10:00:00", 100.0, 50.0), "20260101-100000-bench.json")
    text = summary_markdown(load_results(tmp_path))
    assert "no GPU" in text and "| none |" in text


def test_write_summary_draws_plots(filled):
    path = results.write_summary(filled)
    assert path == filled / "summary.md"
    for name in results.PLOTS:
        assert (filled / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in path.read_text()
    assert not [p for p in filled.iterdir() if p.name.startswith(".")]


def test_write_summary_without_matplotlib(filled, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    text = results.write_summary(filled).read_text()
    assert "Plots need matplotlib" in text and "## Bench: latency" in text


def test_write_summary_of_an_empty_folder(tmp_path):
    assert "0 result file(s)" in results.write_summary(tmp_path / "none").read_text()


def test_compare_rows_side_by_side(filled, monkeypatch):
    rows = {r.label: r for r in compare_rows(load_results(filled), "baseline", "perf")}
    ttft = rows["TTFT mean at 1 req/s (ms)"]
    assert (ttft.a, ttft.b) == (100.0, 50.0) and ttft.change() == "0.50x (better)"
    tput = rows["output tok/s at 10 concurrent"]
    assert (tput.a, tput.b) == (1000.0, 1400.0) and tput.change() == "1.40x (better)"
    assert rows["eval mm_arith (exact_match,last-number)"].change() == "1.14x (better)"
    gpu = rows["GPU memory, server peak (MiB)"]
    assert (gpu.a, gpu.b) == (9000.0, 10200.0)  # from each profile's newest bench
    assert rows["GPU"].change() == ""


def test_compare_needs_results_for_both(filled):
    with pytest.raises(MMError, match="no results for 'ghost'.*mm bench ghost"):
        compare_rows(load_results(filled), "baseline", "ghost")


def test_fmt():
    assert results.fmt(None) == "-" and results.fmt("no GPU") == "no GPU" and results.fmt(3) == "3"
    assert results.fmt(1234.567) == "1234.6" and results.fmt(0.12345, 3) == "0.123"


def gsm8k_doc(profile, stamp, strict, flexible, metrics_only=False, settings=None):
    """An eval of gsm8k_cot; metrics_only: a file from before mm kept every filter (its "primary" was
    the task's first score, and "metrics" held all of them)."""
    task = {"samples": 30, "metrics": {"gsm8k_cot": {"exact_match,strict-match": strict,
                                                      **({} if flexible is None else
                                                         {"exact_match,flexible-extract": flexible})}}}
    if metrics_only:
        task["primary"] = {"metric": "exact_match,strict-match", "value": strict, "stderr": 0.05}
    else:
        task["headline"] = {"metric": "exact_match,flexible-extract", "value": flexible, "stderr": 0.04,
                            "higher_is_better": True, "reason": "flexible-extract reads the answer ..."}
        task["filters"] = [{"filter": "strict-match", "value": strict, "stderr": 0.05},
                           {"filter": "flexible-extract", "value": flexible, "stderr": 0.04}]
    doc = {"schema": 1, "kind": "eval", "profile": profile, "mode": "quick", "complete": True, "started_at": stamp,
           "gpu": "none", "limit": 30, "tasks": {"gsm8k_cot": task}}
    if settings is not None:
        doc["settings"] = settings
    return doc


SETTINGS = {"apply_chat_template": True, "fewshot_as_multiturn": True, "max_gen_toks": 1024,
            "max_gen_toks_for": "tasks that set no length of their own", "gen_kwargs": None, "overrides": []}


def test_summary_shows_every_filter_and_the_set_up(tmp_path):
    write(tmp_path, gsm8k_doc("awq", "2026-01-02T10:00:00", 0.0, 0.4, settings=SETTINGS), "20260102-100000-eval.json")
    text = summary_markdown(load_results(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| awq | gsm8k_cot"))
    assert "| exact_match,flexible-extract | 0.400 ± 0.040 | strict-match 0.000 |" in row
    assert "| multi-turn, <= 1024 tok |" in row and "headline is the filter that measures the model" in text


def test_compare_shows_the_same_metric_for_both(tmp_path):
    write(tmp_path, gsm8k_doc("old", "2026-01-01T10:00:00", 0.3, 0.5, metrics_only=True), "20260101-100000-eval.json")
    write(tmp_path, gsm8k_doc("new", "2026-01-02T10:00:00", 0.0, 0.6, settings=SETTINGS), "20260102-100000-eval.json")
    rows = {r.label: r for r in results.eval_rows(load_results(tmp_path), "old", "new")}
    row = rows["eval gsm8k_cot (exact_match,flexible-extract)"]  # the newer headline, which the old file holds too
    assert (row.a, row.b) == (0.5, 0.6) and row.change() == "1.20x (better)"
    assert (rows["eval gsm8k_cot set-up (differs)"].a, rows["eval gsm8k_cot set-up (differs)"].b) == \
        ("before settings were kept", "multi-turn, <= 1024 tok")


def test_compare_falls_back_to_a_metric_both_have(tmp_path):
    write(tmp_path, gsm8k_doc("old", "2026-01-01T10:00:00", 0.3, None, metrics_only=True), "20260101-100000-eval.json")
    write(tmp_path, gsm8k_doc("new", "2026-01-02T10:00:00", 0.0, 0.6, settings=SETTINGS), "20260102-100000-eval.json")
    [row] = [r for r in results.eval_rows(load_results(tmp_path), "old", "new") if "set-up" not in r.label]
    assert row.label == "eval gsm8k_cot (exact_match,strict-match)" and (row.a, row.b) == (0.3, 0.0)


def test_compare_refuses_different_metrics(tmp_path):
    old = gsm8k_doc("old", "2026-01-01T10:00:00", 0.3, None, metrics_only=True)
    new = gsm8k_doc("new", "2026-01-02T10:00:00", 0.0, 0.6, settings=SETTINGS)
    new["tasks"]["gsm8k_cot"]["filters"] = new["tasks"]["gsm8k_cot"]["filters"][1:]  # flexible only
    new["tasks"]["gsm8k_cot"]["metrics"] = {}
    write(tmp_path, old, "20260101-100000-eval.json")
    write(tmp_path, new, "20260102-100000-eval.json")
    with pytest.raises(MMError) as e:
        compare_rows(load_results(tmp_path), "old", "new")
    msg = str(e.value)
    assert msg.startswith("eval gsm8k_cot: the results score different metrics (new exact_match,flexible-extract, "
                          "old exact_match,strict-match)")
    assert "(fix: `mm eval old --tasks gsm8k_cot` again" in msg and "\n" not in msg


def test_compare_with_a_task_only_one_side_ran(tmp_path):
    write(tmp_path, gsm8k_doc("a", "2026-01-02T10:00:00", 0.1, 0.2, settings=SETTINGS), "20260102-100000-eval.json")
    write(tmp_path, eval_doc("b", "2026-01-02T11:00:00", 0.5), "20260102-110000-eval.json")
    rows = {r.label: r for r in results.eval_rows(load_results(tmp_path), "a", "b")}
    gsm8k = rows["eval gsm8k_cot (exact_match,flexible-extract)"]
    assert (gsm8k.a, gsm8k.b) == (0.2, None)
    assert rows["eval mm_arith (exact_match,last-number)"].b == 0.5


def test_compare_a_profile_with_itself(tmp_path):
    write(tmp_path, gsm8k_doc("a", "2026-01-02T10:00:00", 0.1, 0.2, settings=SETTINGS), "20260102-100000-eval.json")
    [row] = results.eval_rows(load_results(tmp_path), "a", "a")
    assert (row.a, row.b) == (0.2, 0.2) and row.change() == "same"
