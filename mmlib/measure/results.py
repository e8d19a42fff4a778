"""Result files of `mm bench` and `mm eval`, and what is made of them: summary.md, plots, `mm compare`.

A run writes benchmark_results/runs/<profile>/<timestamp>-<kind>.json (mmlib.paths.results_dir()). The
first save claims its name with a hard link, so it is atomic and never replaces another run's
file; later saves of the same run replace it atomically. A run saves after every finished step,
so Ctrl-C (or a crash) keeps what finished, marked "complete": false.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmlib import paths
from mmlib.errors import MMError
from mmlib.measure.memory import NO_GPU
from mmlib.system.files import replace_atomic, write_tmp

SCHEMA = 1
SUMMARY = "summary.md"
PLOTS = ("concurrency.png", "memory.png")


def timestamp(now: float | None = None) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now))


def iso(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))


class ResultFile:
    """One run's file: created exclusively on the first save (a suffix if the name is taken)."""

    def __init__(self, profile: str, kind: str, root: Path | None = None, now: float | None = None):
        self.dir = (root or paths.results_dir()) / profile
        self.stem = f"{timestamp(now)}-{kind}"
        self.path: Path | None = None

    def save(self, doc: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = write_tmp(self.dir, self.stem, json.dumps(doc, indent=1, default=str) + "\n")
        if self.path is None:
            self.path = self._claim(tmp)
        else:
            os.replace(tmp, self.path)
        return self.path

    def _claim(self, tmp: Path) -> Path:
        for n in range(1, 1000):
            path = self.dir / (f"{self.stem}.json" if n == 1 else f"{self.stem}-{n}.json")
            try:
                os.link(tmp, path)  # fails if the name exists: never replaces another run's file
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links: reserve the name, then fill it
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                except FileExistsError:
                    continue
                os.replace(tmp, path)
                return path
            os.unlink(tmp)
            return path
        os.unlink(tmp)
        raise MMError(f"no free result file name for {self.stem} in {self.dir} (fix: clean that folder up)")


def profile_record(profile: Any) -> dict[str, Any]:
    """The profile as merged (extends applied), as `mm profiles show` prints it."""
    from mmlib.profiles.profile import to_dict

    return {"name": profile.name, "source": profile.source, **to_dict(profile)}


def base_doc(kind: str, profile: Any, mode: str, server: dict[str, Any], gpu: str) -> dict[str, Any]:
    from mmlib.profiles.vllm_cmd import installed_vllm

    install = installed_vllm()
    return {
        "schema": SCHEMA, "kind": kind, "profile": profile.name, "mode": mode, "complete": False,
        "started_at": iso(), "finished_at": None,
        "vllm": {"distribution": install.distribution, "version": install.version} if install else None,
        "gpu": gpu, "server": {k: server.get(k) for k in ("url", "endpoint", "pid", "served_model_name", "model")},
        "profile_config": profile_record(profile),
    }


class Recorder:
    """Runs a result's steps (scenarios, tasks) and saves the document after each one."""

    def __init__(self, doc: dict[str, Any], section: str, file: ResultFile, sampler: Any):
        self.doc, self.section, self.file, self.sampler = doc, section, file, sampler
        doc.setdefault(section, {})

    def step(self, name: str, params: dict[str, Any], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0, started = self.sampler.now(), time.monotonic()
        entry = {"params": params, **run(), "complete": True,
                 "duration_s": round(time.monotonic() - started, 2), "t_start": round(t0, 2),
                 "t_end": round(self.sampler.now(), 2)}
        entry["memory"] = self.sampler.stats(t0, entry["t_end"])
        self.doc[self.section][name] = entry
        self.save()
        return entry

    def save(self) -> Path:
        self.doc["memory"] = self.sampler.result()
        return self.file.save(self.doc)

    def finish(self, complete: bool, error: str | None = None) -> Path:
        self.sampler.stop()
        self.doc["complete"] = complete
        self.doc["finished_at"] = iso()
        if error:
            self.doc["error"] = error
        return self.save()


# --- reading ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def finishing(rec: "Recorder", root: Path | None, summary: bool = True):
    """Whatever ends the run (done, an error, Ctrl-C), the result file is closed as complete or not
    and (with `summary`) the summary rewritten; what finished stays. Yields a dict that gets the
    file's "path"."""
    outcome: dict[str, Any] = {"complete": False, "error": None}
    try:
        yield outcome
        outcome["complete"] = True
    except MMError as e:
        outcome["error"] = str(e)
        raise
    finally:
        outcome["path"] = rec.finish(outcome["complete"], outcome["error"])
        if summary:
            write_summary(root)


def load_results(root: Path | None = None) -> list[dict[str, Any]]:
    """Every readable result under root, oldest first; each with "_path" (relative to root)."""
    root = root or paths.results_dir()
    out = []
    for path in root.glob("*/*.json") if root.is_dir() else []:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("kind") in ("bench", "eval") and doc.get("profile"):
            doc["_path"] = str(path.relative_to(root))
            out.append(doc)
    return sorted(out, key=lambda d: (str(d.get("started_at")), d["_path"]))


def latest(results: list[dict], profile: str, kind: str, has: str | None = None) -> dict | None:
    """The newest result of a profile and kind; with `has`, the newest holding that scenario/task."""
    section = "scenarios" if kind == "bench" else "tasks"
    for doc in reversed(results):
        if doc["profile"] == profile and doc["kind"] == kind and (has is None or has in doc.get(section, {})):
            return doc
    return None


def profiles_in(results: list[dict]) -> list[str]:
    return sorted({d["profile"] for d in results})


# --- formatting ---------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def run_label(doc: dict) -> str:
    label = f"{Path(doc['_path']).stem} ({doc.get('mode', '?')})"
    return label if doc.get("complete") else label + ", incomplete"


def scenario_load(params: dict) -> str:
    if params.get("max_concurrency"):
        load = f"{params['max_concurrency']} concurrent"
    elif params.get("request_rate"):
        load = f"{fmt(params['request_rate'], 1)} req/s"
    else:
        load = "all at once"
    return f"{load}, {params.get('input_len')} in / {params.get('output_len')} out"


def concurrency_of(entry: dict) -> float:
    """Where a scenario sits on the concurrency axis: its cap, else what vLLM saw in flight."""
    params, figures = entry.get("params", {}), entry.get("figures", {})
    return float(params.get("max_concurrency") or figures.get("max_concurrent_requests") or 1)


# --- summary.md -----------------------------------------------------------------------------------------
BENCH_COLUMNS = (
    ("mean TTFT ms", "mean_ttft_ms"), ("P99 TTFT ms", "p99_ttft_ms"), ("mean TPOT ms", "mean_tpot_ms"),
    ("output tok/s", "output_throughput"), ("peak tok/s", "max_output_tokens_per_s"),
    ("total tok/s", "total_token_throughput"), ("failed", "failed"),
)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _scenario_names(results: list[dict]) -> list[str]:
    from mmlib.measure.scenarios import SCENARIOS

    seen = {n for d in results if d["kind"] == "bench" for n in d.get("scenarios", {})}
    return [n for n in SCENARIOS if n in seen] + sorted(seen - set(SCENARIOS))


def summary_markdown(results: list[dict], plots: list[str] | None = None, note: str = "") -> str:
    from mmlib.measure.scenarios import SCENARIOS

    profiles = profiles_in(results)
    lines = ["# mm benchmark results", "",
             f"Made by mm from {len(results)} result file(s) in this folder (the newest run of each "
             "profile per table); `mm bench` and `mm eval` rewrite it, so do not edit it by hand. "
             "`mm compare A B` puts two profiles side by side.", ""]
    for name in _scenario_names(results):
        nominal = SCENARIOS[name].describe() if name in SCENARIOS else name
        rows = []
        for p in profiles:
            doc = latest(results, p, "bench", has=name)
            if not doc:
                continue
            entry = doc["scenarios"][name]
            fig, mem = entry.get("figures", {}), entry.get("memory", {}).get("peak", {})
            rows.append([p, run_label(doc), doc.get("gpu") or "none", scenario_load(entry["params"]),
                         fmt(entry["params"].get("prompts"))]
                        + [fmt(fig.get(key), 0 if key == "failed" else 1) for _, key in BENCH_COLUMNS]
                        + [fmt(mem.get("gpu_server_mib"), 0), fmt(mem.get("rss_mib"), 0)])
        lines += [f"## Bench: {name} ({nominal})", ""]
        lines += _table(["profile", "run", "GPU", "load", "prompts", *(c for c, _ in BENCH_COLUMNS),
                         "server GPU MiB (peak)", "server RAM MiB (peak)"], rows) + [""]
    lines += _eval_section(results, profiles) + _memory_section(results, profiles)
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def headline_of(task: dict) -> dict[str, Any]:
    """A task's headline score: metric ("metric,filter"), value, stderr, reason (files before mm kept
    every filter call it "primary" and it was the task's first score)."""
    head = task.get("headline") or task.get("primary") or {}
    return {"metric": head.get("metric", "-"), "value": head.get("value"), "stderr": head.get("stderr"),
            "higher_is_better": head.get("higher_is_better"), "reason": head.get("reason")}


def score_of(task: dict, name: str, key: str) -> Any:
    """The task's score under "metric,filter" key, wherever the result keeps it; None if it has none."""
    head = headline_of(task)
    if head["metric"] == key:
        return head["value"]
    metric, _, filt = key.partition(",")
    for f in task.get("filters") or []:
        if f.get("filter") == filt and metric == head["metric"].partition(",")[0]:
            return f.get("value")
    return (task.get("metrics") or {}).get(name, {}).get(key)


def other_filters(task: dict) -> str:
    """The headline metric's other filters and their scores, e.g. "strict-match 0.000"."""
    head = headline_of(task)["metric"].partition(",")[2]
    return ", ".join(f"{f['filter']} {fmt(f.get('value'), 3)}" for f in task.get("filters") or []
                     if f.get("filter") != head) or "-"


def eval_setup(doc: dict) -> str:
    """How the run asked the model, short: few-shot turns, answer length, limit."""
    s = doc.get("settings")
    if not s:
        return "before settings were kept"
    turns = "multi-turn" if s.get("fewshot_as_multiturn") else "one message"
    extra = f", {s['gen_kwargs']}" if s.get("gen_kwargs") else ""
    return f"{turns}, <= {s.get('max_gen_toks')} tok{extra}"


def _eval_section(results: list[dict], profiles: list[str]) -> list[str]:
    tasks = sorted({t for d in results if d["kind"] == "eval" for t in d.get("tasks", {})})
    rows = []
    for p in profiles:
        for t in tasks:
            doc = latest(results, p, "eval", has=t)
            if not doc:
                continue
            entry = doc["tasks"][t]
            head = headline_of(entry)
            stderr = head["stderr"]
            score = fmt(head["value"], 3) + (f" ± {fmt(stderr, 3)}" if isinstance(stderr, (int, float)) else "")
            rows.append([p, t, head["metric"], score, other_filters(entry), fmt(entry.get("samples")),
                         eval_setup(doc), run_label(doc), doc.get("gpu") or "none"])
    if not rows:
        return []
    return ["## Eval (lm-evaluation-harness through the chat API)", "",
            "The headline is the filter that measures the model rather than its formatting (for gsm8k: "
            "flexible-extract); the others are beside it. `mm eval` explains a zero or a large gap.", ""] + \
        _table(["profile", "task", "headline metric", "score", "other filters", "samples", "set-up", "run", "GPU"],
               rows) + [""]


def _memory_section(results: list[dict], profiles: list[str]) -> list[str]:
    rows = []
    for p in profiles:
        for kind in ("bench", "eval"):
            doc = latest(results, p, kind)
            if not doc or "memory" not in doc:
                continue
            m = doc["memory"]
            peak, mean = m.get("peak", {}), m.get("mean", {})
            rows.append([p, kind, run_label(doc), m.get("gpu", NO_GPU), fmt(peak.get("gpu_server_mib"), 0),
                         fmt(peak.get("gpu_device_mib"), 0), fmt(peak.get("rss_mib"), 0),
                         fmt(mean.get("rss_mib"), 0), fmt(peak.get("ram_used_mib"), 0)])
    if not rows:
        return []
    return ["## Memory while running (sampled at 4 Hz)", "",
            "Server GPU is what NVML attributes to the server's processes; device GPU is the whole card. "
            "Server RAM is the RSS of the server's process tree (KV offload to RAM shows here); system RAM "
            "is all memory in use on the machine.", ""] + \
        _table(["profile", "kind", "run", "GPU", "server GPU MiB (peak)", "device GPU MiB (peak)",
                "server RAM MiB (peak)", "server RAM MiB (mean)", "system RAM MiB (peak)"], rows) + [""]


def write_summary(root: Path | None = None, plots: bool = True) -> Path:
    """Regenerate summary.md (and the plots) from every result under root."""
    root = root or paths.results_dir()
    results = load_results(root)
    made, note = [], ""
    if plots and results:
        try:
            made = write_plots(results, root)
        except ImportError:
            note = "Plots need matplotlib (`pip install 'mm[eval]'`); none were drawn."
        except Exception as e:  # a plot must never cost the run its summary
            note = f"The plots could not be drawn ({type(e).__name__}: {e})."
    path = root / SUMMARY
    replace_atomic(path, summary_markdown(results, made, note))
    return path


# --- plots ----------------------------------------------------------------------------------------------
def write_plots(results: list[dict], root: Path) -> list[str]:
    """concurrency.png (throughput and TTFT vs concurrency) and memory.png (memory over time), from
    each profile's newest bench. matplotlib is imported here only, with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [d for p in profiles_in(results) if (d := latest(results, p, "bench"))]
    made = []
    for name, draw in zip(PLOTS, (_plot_concurrency, _plot_memory)):
        if benches:
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
            draw(benches, *axes)
            save_figure(fig, root / name, plt)
            made.append(name)
    return made


def _plot_concurrency(benches: list[dict], ax_tp: Any, ax_ttft: Any) -> None:
    for i, doc in enumerate(benches):
        color = f"C{i % 10}"
        entries = sorted(doc.get("scenarios", {}).items(), key=lambda item: concurrency_of(item[1]))
        xs = [concurrency_of(e) for _, e in entries]
        figs = [e.get("figures", {}) for _, e in entries]
        ax_tp.plot(xs, [f.get("output_throughput") for f in figs], marker="o", color=color, label=doc["profile"])
        for x, (name, _), f in zip(xs, entries, figs):
            if isinstance(f.get("output_throughput"), (int, float)):
                ax_tp.annotate(name, (x, f["output_throughput"]), fontsize="x-small", textcoords="offset points",
                               xytext=(4, -10))
        ax_ttft.plot(xs, [f.get("mean_ttft_ms") for f in figs], marker="o", color=color,
                     label=f"{doc['profile']} mean")
        ax_ttft.plot(xs, [f.get("p99_ttft_ms") for f in figs], marker="x", linestyle="--", color=color,
                     label=f"{doc['profile']} P99")
    for ax, title, unit in ((ax_tp, "Output throughput", "tokens/s"), (ax_ttft, "Time to first token", "ms")):
        ax.set(title=title, xlabel="concurrent requests", ylabel=unit)
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")


MEMORY_LINES = (("gpu_server_mib", "-", "server"), ("gpu_device_mib", "--", "whole device"),
                ("rss_mib", "-", "server tree RSS"), ("ram_used_mib", "--", "system in use"))


def _plot_memory(benches: list[dict], ax_gpu: Any, ax_ram: Any) -> None:
    any_gpu = False
    for i, doc in enumerate(benches):
        s = doc.get("memory", {}).get("series", {})
        for key, style, what in MEMORY_LINES:
            pts = _points(s.get("t", []), s.get(key))
            ax = ax_gpu if key.startswith("gpu") else ax_ram
            if pts:
                ax.plot(*zip(*pts), linestyle=style, color=f"C{i % 10}", label=f"{doc['profile']} {what}")
                any_gpu = any_gpu or ax is ax_gpu
    if len(benches) == 1:  # one run: shade where each scenario ran
        for i, (name, e) in enumerate(benches[0].get("scenarios", {}).items()):
            t0, t1 = e.get("t_start", 0), e.get("t_end", 0)
            for ax in (ax_gpu, ax_ram) if any_gpu else (ax_ram,):
                ax.axvspan(t0, t1, alpha=0.08, color=f"C{i % 10}")
            ax_ram.annotate(name, ((t0 + t1) / 2, 1.0), xycoords=("data", "axes fraction"), ha="center",
                            va="bottom", fontsize="small")
    if not any_gpu:
        ax_gpu.text(0.5, 0.5, NO_GPU, ha="center", va="center", transform=ax_gpu.transAxes, fontsize=14)
        ax_gpu.set_xticks([])
        ax_gpu.set_yticks([])
    for ax, title in ((ax_gpu, "GPU memory"), (ax_ram, "RAM")):
        ax.set(xlabel="seconds into the run", ylabel="MiB")
        ax.set_title(title, pad=14)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")


def _points(t: list[float], values: Any) -> list[tuple[float, float]]:
    if not isinstance(values, list):
        return []
    return [(x, y) for x, y in zip(t, values) if isinstance(y, (int, float))]


def save_figure(fig: Any, path: Path, plt: Any) -> None:
    """A PNG written whole (a temp file beside it, then a rename), and the figure closed."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --- compare --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    label: str
    a: Any
    b: Any
    higher_is_better: bool | None = None  # None: not a figure of merit (a version, a date)
    digits: int = 1

    def change(self) -> str:
        a, b = self.a, self.b
        if self.higher_is_better is None or not all(isinstance(v, (int, float)) for v in (a, b)) or not a:
            return ""
        ratio = b / a
        if abs(ratio - 1) < 0.005:
            return "same"
        better = (ratio > 1) == self.higher_is_better
        return f"{ratio:.2f}x ({'better' if better else 'worse'})"


def _fig(results: list[dict], profile: str, scenario: str, key: str) -> Any:
    doc = latest(results, profile, "bench", has=scenario)
    return doc["scenarios"][scenario].get("figures", {}).get(key) if doc else None


def compare_rows(results: list[dict], a: str, b: str) -> list[Row]:
    """The seed's side-by-side table (baseline vs max perf), from each profile's newest results."""
    for p in (a, b):
        if not any(d["profile"] == p for d in results):
            raise MMError(f"no results for '{p}' in {paths.results_dir()} (fix: run `mm bench {p}` first)")
    ba, bb = latest(results, a, "bench"), latest(results, b, "bench")

    def meta(doc: dict | None, key: str) -> Any:
        if not doc:
            return None
        if key == "vllm":
            return (doc.get("vllm") or {}).get("version")
        return run_label(doc) if key == "run" else doc.get(key)

    def mem(doc: dict | None, key: str) -> Any:
        return (doc or {}).get("memory", {}).get("peak", {}).get(key)

    rows = [Row("bench run", meta(ba, "run"), meta(bb, "run")), Row("GPU", meta(ba, "gpu"), meta(bb, "gpu")),
            Row("vLLM", meta(ba, "vllm"), meta(bb, "vllm"))]
    for scenario, key, label, better in (
            ("latency", "mean_ttft_ms", "TTFT mean at 1 req/s (ms)", False),
            ("latency", "p99_ttft_ms", "TTFT P99 at 1 req/s (ms)", False),
            ("latency", "mean_tpot_ms", "TPOT mean at 1 req/s (ms)", False),
            ("c10", "output_throughput", "output tok/s at 10 concurrent", True),
            ("c10", "mean_ttft_ms", "TTFT mean at 10 concurrent (ms)", False),
            ("burst", "output_throughput", "output tok/s at 50 concurrent", True),
            ("heavy", "output_throughput", "output tok/s at 100 concurrent", True),
            ("heavy", "max_output_tokens_per_s", "peak output tok/s at 100 concurrent", True),
            ("heavy", "p99_ttft_ms", "TTFT P99 at 100 concurrent (ms)", False)):
        rows.append(Row(label, _fig(results, a, scenario, key), _fig(results, b, scenario, key), better))
    fails = [sum((e.get("figures", {}).get("failed") or 0) for e in d.get("scenarios", {}).values()) if d else None
             for d in (ba, bb)]
    rows.append(Row("failed requests (newest bench)", *fails, False, 0))
    for key, label in (("gpu_server_mib", "GPU memory, server peak (MiB)"),
                       ("gpu_device_mib", "GPU memory, whole device peak (MiB)"),
                       ("rss_mib", "RAM, server process tree peak (MiB)"),
                       ("ram_used_mib", "RAM in use, system peak (MiB)")):
        rows.append(Row(label, mem(ba, key), mem(bb, key), None, 0))
    return rows + eval_rows(results, a, b)


def eval_rows(results: list[dict], a: str, b: str) -> list[Row]:
    """Each task scored by the same metric for both profiles (the newer result's headline where the
    other holds it too); MMError where the two results have no metric in common."""
    rows = []
    tasks = sorted({t for d in results if d["kind"] == "eval" and d["profile"] in (a, b) for t in d.get("tasks", {})})
    for t in tasks:
        docs = [latest(results, p, "eval", has=t) for p in (a, b)]  # a list: `mm compare x x` is allowed
        have = [d for d in docs if d]
        key = _common_metric(t, have)
        values = [score_of(d["tasks"][t], t, key) if d else None for d in docs]
        better = headline_of(have[0]["tasks"][t])["higher_is_better"]
        rows.append(Row(f"eval {t} ({key})", *values, better is not False, 3))
        setups = [eval_setup(d) if d else None for d in docs]
        if all(setups) and setups[0] != setups[1]:
            rows.append(Row(f"eval {t} set-up (differs)", *setups))
    return rows


def _common_metric(task: str, docs: list[dict]) -> str:
    newest_first = sorted(docs, key=lambda d: str(d.get("started_at")), reverse=True)
    keys = [headline_of(d["tasks"][task])["metric"] for d in newest_first]
    for key in keys:
        if all(score_of(d["tasks"][task], task, key) is not None for d in docs):
            return key
    old = newest_first[-1]
    shown = ", ".join(f"{d['profile']} {k}" for d, k in zip(newest_first, keys))
    raise MMError(f"eval {task}: the results score different metrics ({shown}) and do not compare "
                  f"(fix: `mm eval {old['profile']} --tasks {task}` again, so both results keep every filter)")
