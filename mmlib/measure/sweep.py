"""The concurrency sweep (`mm bench --sweep`): throughput and latency against concurrency for one
profile's server, the knee, and the best concurrency remembered for batch work (`mm batch`).

Each level is one run of vLLM's own `vllm bench serve` (measure/bench.py's path: the same memory
sampling, result file and Ctrl-C handling) with `--max-concurrency C`, the random dataset with fixed
input and output lengths, and enough prompts for C requests to stay in flight most of the run.

The knee: the lowest concurrency whose output throughput reaches KNEE_SHARE (95%) of the best level's.
Past it more requests in flight buy little throughput and cost latency; it is what `mm batch` runs at.
Where latency starts to climb is said apart: the first level whose median TTFT is more than
TTFT_CLIMB times the lowest level's.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mmlib import paths
from mmlib.errors import MMError
from mmlib.measure.scenarios import CPU_QUICK_LENGTH_DIVISOR, CPU_QUICK_MAX_PROMPTS, QUICK, Plan

DEFAULT_CONCURRENCY = 32  # before any sweep of the profile was measured
LEVELS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_LEVELS = (1, 4, 16, 64, 256)  # the short sweep `mm batch` runs on first use
# (input, output) tokens per prompt: a full sweep as the c10 scenario; a short one cuts the answers.
FULL_LENGTHS, QUICK_LENGTHS = (256, 256), (128, 64)
FULL_MIN_PROMPTS, FULL_MAX_PROMPTS = 32, 1024  # per level: 4 x C, within these
QUICK_MIN_PROMPTS = 8  # per level: 2 x C, at least this
KNEE_SHARE = 0.95
TTFT_CLIMB = 2.0
KNEE_DEFINITION = (f"the lowest concurrency whose output throughput reaches {KNEE_SHARE:.0%} of the best level's; "
                   f"TTFT climbs at the first level whose median TTFT exceeds {TTFT_CLIMB:g}x the lowest level's")
SECTION = "levels"
STORE_SCHEMA = 1
STORE_MAX_SETUPS = 64  # the newest are kept


# --- the plan -------------------------------------------------------------------------------------------
def parse_levels(text: str) -> tuple[int, ...]:
    """"1,4,16" -> (1, 4, 16): sorted, each once; a one-line error naming the flag otherwise."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise MMError(f"--levels '{text}': not a list of concurrencies "
                      f"(fix: whole numbers from 1 up, comma-separated, e.g. --levels 1,4,16,64)")
    return tuple(sorted(set(values)))


def level_name(concurrency: int) -> str:
    return f"c{concurrency}"


def level_plans(levels: Sequence[int], mode: str, cpu: bool, prompts: int | None = None,
                input_len: int | None = None, output_len: int | None = None) -> list[Plan]:
    """One vLLM bench run per level. Full: 4 x C prompts (32 to 1024), 256 in / 256 out, 2 warm-ups.
    Quick (the short sweep): 2 x C prompts (at least 8), 128 in / 64 out. On a CPU build quick
    also takes mm bench --quick's scaling: lengths / 8, and no more prompts than C or 8."""
    out = []
    for c in sorted(set(levels)):
        if mode == QUICK:
            n, (i, o) = max(2 * c, QUICK_MIN_PROMPTS), QUICK_LENGTHS
        else:
            n, (i, o) = min(max(4 * c, FULL_MIN_PROMPTS), FULL_MAX_PROMPTS), FULL_LENGTHS
        scaled = cpu and mode == QUICK
        if scaled:
            n, i, o = max(c, min(n, CPU_QUICK_MAX_PROMPTS)), i // CPU_QUICK_LENGTH_DIVISOR, o // CPU_QUICK_LENGTH_DIVISOR
        out.append(Plan(level_name(c), prompts or n, input_len or i, output_len or o, request_rate=None,
                        max_concurrency=c, warmups=0 if mode == QUICK else 2, scaled_for_cpu=scaled))
    return out


# --- the curve ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One level's figures, as vLLM's bench measured them (None where it reported none)."""
    concurrency: int
    prompts: int | None
    output_tok_s: float | None
    req_s: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    itl_p50_ms: float | None
    failed: int | None

    def line(self) -> str:
        """The result file's line of this level (benchmarks/batch12.py)."""
        return (f"sweep c={self.concurrency} out_tok_s={_num(self.output_tok_s)} req_s={_num(self.req_s, 2)} "
                f"ttft_p50_ms={_num(self.ttft_p50_ms)} ttft_p99_ms={_num(self.ttft_p99_ms)} "
                f"tpot_p50_ms={_num(self.tpot_p50_ms, 2)} itl_p50_ms={_num(self.itl_p50_ms, 2)} "
                f"failed={self.failed if self.failed is not None else 'n/a'}")


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _figure(figures: dict[str, Any], key: str) -> float | None:
    v = figures.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def points(doc: dict[str, Any]) -> list[Point]:
    """The sweep's levels, lowest concurrency first."""
    out = []
    for entry in doc.get(SECTION, {}).values():
        params, fig = entry.get("params", {}), entry.get("figures", {})
        if not params.get("max_concurrency"):
            continue
        failed = fig.get("failed")
        out.append(Point(int(params["max_concurrency"]), params.get("prompts"), _figure(fig, "output_throughput"),
                         _figure(fig, "request_throughput"), _figure(fig, "median_ttft_ms"),
                         _figure(fig, "p99_ttft_ms"), _figure(fig, "median_tpot_ms"), _figure(fig, "median_itl_ms"),
                         int(failed) if isinstance(failed, (int, float)) else None))
    return sorted(out, key=lambda p: p.concurrency)


def knee(curve: Sequence[Point], share: float = KNEE_SHARE) -> Point | None:
    """The lowest concurrency reaching `share` of the best output throughput; None if no level
    measured any."""
    measured = [p for p in curve if p.output_tok_s]
    if not measured:
        return None
    best = max(p.output_tok_s or 0.0 for p in measured)
    return min((p for p in measured if (p.output_tok_s or 0.0) >= share * best), key=lambda p: p.concurrency)


def ttft_climb(curve: Sequence[Point], factor: float = TTFT_CLIMB) -> Point | None:
    """The first level whose median TTFT exceeds `factor` x the lowest level's; None if none does."""
    timed = sorted((p for p in curve if p.ttft_p50_ms), key=lambda p: p.concurrency)
    if len(timed) < 2:
        return None
    base = timed[0].ttft_p50_ms or 0.0
    return next((p for p in timed[1:] if (p.ttft_p50_ms or 0.0) > factor * base), None)


def analyse(doc: dict[str, Any]) -> dict[str, Any]:
    """The knee, the best level and where TTFT climbs, as the result file keeps them."""
    curve = points(doc)
    k, climb = knee(curve), ttft_climb(curve)
    measured = [p for p in curve if p.output_tok_s]
    best = max(measured, key=lambda p: p.output_tok_s or 0.0) if measured else None
    return {"concurrency": k.concurrency if k else None, "output_throughput": k.output_tok_s if k else None,
            "best_concurrency": best.concurrency if best else None,
            "best_output_throughput": best.output_tok_s if best else None,
            "ttft_climbs_at": climb.concurrency if climb else None,
            "lowest_level_ttft_p50_ms": curve[0].ttft_p50_ms if curve else None,
            "share": KNEE_SHARE, "ttft_climb_factor": TTFT_CLIMB, "definition": KNEE_DEFINITION}


def describe(found: dict[str, Any]) -> str:
    """The knee in a line or two, for the terminal."""
    if found.get("concurrency") is None:
        return "knee: none (no level measured any output throughput)"
    text = (f"knee: c={found['concurrency']}, the lowest concurrency reaching {found['share']:.0%} of the best "
            f"output throughput ({_num(found['output_throughput'], 0)} of {_num(found['best_output_throughput'], 0)} "
            f"tok/s, best at c={found['best_concurrency']})")
    climb = found.get("ttft_climbs_at")
    lowest = _num(found.get("lowest_level_ttft_p50_ms"), 0)
    text += (f"; median TTFT climbs past {found['ttft_climb_factor']:g}x the lowest level's ({lowest} ms) from c={climb}"
             if climb else f"; median TTFT stays within {found['ttft_climb_factor']:g}x the lowest level's "
                           f"({lowest} ms) on every level")
    return text


# --- the plot -------------------------------------------------------------------------------------------
def write_plot(doc: dict[str, Any], path: Path) -> Path:
    """Output throughput against concurrency, and latency (TTFT p50/p99, TPOT p50) on a second
    axis, the knee marked. matplotlib is imported here only, with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmlib.measure.results import save_figure

    curve = points(doc)

    def series(key: str) -> list[float]:
        return [math.nan if getattr(p, key) is None else getattr(p, key) for p in curve]

    xs = [p.concurrency for p in curve]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, series("output_tok_s"), marker="o", color="C0", label="output tok/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set(xlabel="requests in flight (--max-concurrency)", ylabel="output tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    latency = ax.twinx()
    for key, style, color, label in (("ttft_p50_ms", "-", "C1", "TTFT p50"), ("ttft_p99_ms", "--", "C1", "TTFT p99"),
                                     ("tpot_p50_ms", "-", "C2", "TPOT p50")):
        latency.plot(xs, series(key), linestyle=style, marker=".", color=color, label=label)
    timed = [v for v in series("ttft_p99_ms") + series("tpot_p50_ms") if v > 0]
    if timed and max(timed) / min(timed) > 20:
        latency.set_yscale("log")
    latency.set_ylabel("latency, ms")
    found = doc.get("knee") or analyse(doc)
    if found.get("concurrency"):
        ax.axvline(found["concurrency"], color="grey", linestyle=":")
        ax.annotate(f"knee c={found['concurrency']}", (found["concurrency"], 0.02), xycoords=("data", "axes fraction"),
                    xytext=(4, 0), textcoords="offset points", fontsize="small", color="grey")
    handles = ax.get_legend_handles_labels()
    more = latency.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize="small", loc="upper left")
    first = next(iter(doc.get(SECTION, {}).values()), {}).get("params", {})
    gpu = doc.get("gpu") if doc.get("gpu") not in (None, "none") else "no GPU"
    ax.set_title(f"{doc.get('profile')}: throughput and latency vs concurrency ({gpu}; "
                 f"{first.get('input_len')} in / {first.get('output_len')} out)", fontsize="medium")
    save_figure(fig, path, plt)
    return path


# --- the remembered best concurrency ---------------------------------------------------------------------
def card_of(probe: Any = None) -> dict[str, Any]:
    """The card as the remembered value is keyed: its name and total memory ("none", 0 without one)."""
    from mmlib.system import nvml

    nv = probe or nvml.session()
    found = nv.device_bytes() if nv.available else None
    return {"card": nvml.gpu_name(nv) if nv.available else "none", "card_mib": found[1] >> 20 if found else 0}


def setup_of(profile: Any, server: dict[str, Any], card: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the best concurrency depends on: the profile (and a digest of its engine and memory
    settings: max_num_seqs, context, ...), the model served, vLLM's version and the card."""
    from mmlib.profiles.vllm_cmd import installed_vllm

    install = installed_vllm()
    settings = {"engine": dict(profile.engine), "memory": profile.memory.to_table() if profile.memory else None}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"profile": profile.name, "model": server.get("model") or profile.model,
            "vllm": install.version if install else None, **(card or card_of()), "settings": digest}


def setup_key(setup: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_store(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("setups"), dict):
        return {"schema": STORE_SCHEMA, "setups": {}}
    return doc


def remember(setup: dict[str, Any], concurrency: int, source: str, result: Path | None,
             found: dict[str, Any] | None = None, now: float | None = None, path: Path | None = None) -> None:
    """Keep `concurrency` as the best for this setup (atomically; the newest STORE_MAX_SETUPS setups stay)."""
    from mmlib.measure.results import iso
    from mmlib.system.files import replace_atomic

    path = path or paths.best_concurrency_file()
    doc = _read_store(path)
    doc["setups"][setup_key(setup)] = {
        "concurrency": concurrency, "source": source, "measured_at": iso(now), "result": str(result) if result else None,
        "output_throughput": (found or {}).get("output_throughput"),
        "best_output_throughput": (found or {}).get("best_output_throughput"), "setup": setup}
    newest = sorted(doc["setups"].items(), key=lambda kv: str(kv[1].get("measured_at")), reverse=True)
    doc["setups"] = dict(newest[:STORE_MAX_SETUPS])
    replace_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n", mode=0o600)


def recall(setup: dict[str, Any], path: Path | None = None) -> dict[str, Any] | None:
    """The remembered entry for exactly this setup; None if a sweep never measured it."""
    entry = _read_store(path or paths.best_concurrency_file())["setups"].get(setup_key(setup))
    if not isinstance(entry, dict) or not isinstance(entry.get("concurrency"), int) or entry["concurrency"] < 1:
        return None
    return entry if entry.get("setup") == setup else None


# --- running it -----------------------------------------------------------------------------------------
class LevelRunner:
    """bench.run's runner for a sweep: every level in one helper process (measure/bench_levels.py),
    started at the first level and ended by close()."""

    def __init__(self) -> None:
        self.helper: Any = None

    def __call__(self, p: Plan, target: Any, workdir: Path, log: Path, on_progress: Any = None) -> dict[str, Any]:
        import sys

        from mmlib.measure.bench import bench_args, bench_env, progress_ticker, read_vllm_result
        from mmlib.measure.helper import KeptHelper

        if self.helper is None:
            self.helper = KeptHelper([sys.executable, "-m", "mmlib.measure.bench_levels"], bench_env(target), log,
                                     what="vLLM's bench")
        filename, done = f"{p.scenario}.json", workdir / f"{p.scenario}.done"
        status = self.helper.run({"argv": bench_args(p, target, workdir, filename), "done": str(done)}, done,
                                 progress_ticker(target, on_progress))
        if status != "0":
            raise MMError(f"vLLM's bench ({p.scenario}) failed: {status}; see {log}")
        return read_vllm_result(workdir / filename)

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()
            self.helper = None


def run(profile: Any, server: dict[str, Any], plans: list[Plan], mode: str, ui: Any = None,
        root: Path | None = None, runner: Any = None, sampler: Any = None, file: Any = None,
        source: str | None = None, card: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Run the levels (bench.run), then add the knee, draw the plot beside the result
    (<result>.png) and remember the knee for `mm batch`. Returns the result file and document."""
    from mmlib.measure import bench, results

    file = file or results.ResultFile(profile.name, "sweep", root)
    levels = runner or LevelRunner()
    try:
        path, doc = bench.run(profile, server, plans, mode, ui=ui, root=root, runner=levels, sampler=sampler,
                              file=file, kind="sweep", section=SECTION)
    finally:
        if runner is None:
            levels.close()
    doc["knee"] = found = analyse(doc)
    try:
        doc["plot"] = write_plot(doc, path.with_suffix(".png")).name
    except ImportError:
        doc["plot_note"] = "no plot: matplotlib is not installed (pip install 'mm[eval]')"
    except Exception as e:  # a plot must never cost the sweep its knee
        doc["plot_note"] = f"the plot could not be drawn ({type(e).__name__}: {e})"
    path = file.save(doc)
    if found["concurrency"]:
        remember(setup_of(profile, server, card), found["concurrency"],
                 source or f"`mm bench {profile.name} --sweep`", path, found)
    return path, doc


def best_concurrency(profile: Any, server: dict[str, Any], quick_sweep: bool = True,
                     ui: Any = None) -> tuple[int, str]:
    """The concurrency batch work runs at for `profile`, served as `server` (cli/bench.serve's
    snapshot: its "endpoint", "api_key", ...): the best one a sweep measured, remembered per profile,
    model, vLLM version and card; else, with quick_sweep, a short sweep run now and remembered; else
    DEFAULT_CONCURRENCY. Returns (concurrency, a few words saying where it came from)."""
    from mmlib.profiles.vllm_cmd import installed_vllm

    setup = setup_of(profile, server)
    entry = recall(setup)
    if entry:
        return entry["concurrency"], f"measured by {entry['source']} on {str(entry['measured_at'])[:10]}"
    if not quick_sweep:
        return DEFAULT_CONCURRENCY, (f"mm's default (no sweep measured for this setup yet; "
                                     f"`mm bench {profile.name} --sweep` measures one)")
    install = installed_vllm()
    plans = level_plans(QUICK_LEVELS, QUICK, cpu=bool(install and install.is_cpu))
    t0 = time.monotonic()
    path, doc = run(profile, server, plans, QUICK, ui=ui, source="a short sweep (`mm batch`)", card=setup_card(setup))
    found = doc["knee"]
    if not found["concurrency"]:
        return DEFAULT_CONCURRENCY, f"mm's default (the short sweep measured no throughput; see {path})"
    return found["concurrency"], (f"a short sweep just now (levels {','.join(map(str, QUICK_LEVELS))}, "
                                  f"{time.monotonic() - t0:.0f} s; {path})")


def setup_card(setup: dict[str, Any]) -> dict[str, Any]:
    return {"card": setup["card"], "card_mib": setup["card_mib"]}
