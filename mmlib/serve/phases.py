"""What a starting vLLM server is doing, read from its log as it is written: a Phase (loading weights
45%, compiling, capturing CUDA graphs 30/67, KV cache size, ready) for `mm up` and `mm status`, and
for timeouts that apply per phase instead of to the whole start.

Pure: PhaseTracker is fed the log's new text (bytes or str, any chunking) and keeps the current
phase; the clock is injected. The patterns are vLLM 0.32's own log messages (CPU lines taken from a
real log, tests/fixtures/vllm-cpu-start.log; GPU lines from vLLM's source: gpu_model_runner.py,
default_loader.py, weight_utils.py, compilation/monitor.py and backends.py, kv_cache_utils.py,
gpu_worker.py, kernel_warmup.py, engine/core.py, api_server/entry.py). A line no pattern knows
leaves the phase as it is.
"""
from __future__ import annotations

import codecs
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

STARTING = "starting"
INITIALIZING = "initializing"
DOWNLOADING = "downloading"
LOADING = "loading weights"
COMPILING = "compiling"
PROFILING = "profiling memory"
KV_CACHE = "KV cache"
CUDA_GRAPHS = "capturing CUDA graphs"
WARMING_UP = "warming up"
API_SERVER = "starting API server"
READY = "ready"

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_PARTIAL = 64 * 1024  # a "line" longer than this without a break is not a log line worth keeping


@dataclass(frozen=True)
class Phase:
    name: str
    detail: str = ""
    percent: float | None = None  # 0-100 where vLLM prints progress
    since: float = 0.0  # when this phase began (the tracker's clock)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    phase: str
    detail: Callable[[re.Match], str] = lambda m: ""
    percent: Callable[[re.Match], float | None] = lambda m: None
    facts: Callable[[re.Match], dict] = lambda m: {}


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _rule(pattern: str, phase: str, **kw: Callable) -> Rule:
    return Rule(re.compile(pattern), phase, **kw)


RULES: tuple[Rule, ...] = (
    # --- ready (api_server/entry.py; vLLM <= 0.2x said "Starting vLLM API server 0 on ...") ---
    _rule(r"Starting vLLM (?:API )?server(?: \d+)? on (\S+)", READY, detail=lambda m: m[1]),
    _rule(r"Application startup complete", READY),
    # --- start of the engine ---
    _rule(r"Initializing a V1 LLM engine \(v([^)]+)\)", INITIALIZING, detail=lambda m: f"vLLM {m[1]}"),
    _rule(r"Resolved architecture: (\w+)", INITIALIZING, detail=lambda m: m[1]),
    # --- weights: downloaded (vLLM downloads silently, hub bars where shown), then loaded ---
    _rule(r"Time spent downloading weights for \S+: ([\d.]+) seconds", LOADING,
          detail=lambda m: f"downloaded in {_num(m[1]):.0f} s", facts=lambda m: {"download_s": _num(m[1])}),
    _rule(r"(Fetching \d+ files|Downloading[^:]*|[\w.-]+\.(?:safetensors|bin|pt)):\s+(\d+)%\|", DOWNLOADING,
          detail=lambda m: m[1], percent=lambda m: _num(m[2])),
    _rule(r"Starting to load model (\S+?)(?:\.\.\.)?$", LOADING),
    _rule(r"Loading model from scratch", LOADING),
    _rule(r"([^:]*[Ll]oading[^:]*):\s+(\d+)% Completed \| (\d+)/(\d+)", LOADING,
          detail=lambda m: f"shard {m[3]}/{m[4]}", percent=lambda m: _num(m[2])),
    _rule(r"Loading weights took ([\d.]+) seconds", LOADING, detail=lambda m: f"loaded in {_num(m[1]):.1f} s",
          percent=lambda m: 100.0, facts=lambda m: {"load_s": _num(m[1])}),
    _rule(r"Model loading took ([\d.]+) GiB memory and ([\d.]+) seconds", PROFILING,
          detail=lambda m: f"weights take {m[1]} GiB", facts=lambda m: {"weights_gib": _num(m[1])}),
    # --- torch.compile, Dynamo, FlashInfer JIT ---
    _rule(r"Starting torch\.compile", COMPILING, detail=lambda m: "torch.compile"),
    _rule(r"Dynamo bytecode transform time: ([\d.]+) s", COMPILING,
          detail=lambda m: f"torch.compile (Dynamo took {_num(m[1]):.0f} s)"),
    _rule(r"Compiling a graph for compile range (.+?) takes ([\d.]+) s", COMPILING,
          detail=lambda m: f"compiled the graph for range {m[1]}"),
    _rule(r"Directly load the compiled graph", COMPILING, detail=lambda m: "loading cached compiled graphs"),
    _rule(r"torch\.compile (?:took|takes) ([\d.]+) s in total", PROFILING,
          detail=lambda m: f"torch.compile took {_num(m[1]):.0f} s", facts=lambda m: {"compile_s": _num(m[1])}),
    _rule(r"JIT kernel warmup starting", COMPILING, detail=lambda m: "JIT kernels"),
    _rule(r"Running FlashInfer autotune", COMPILING, detail=lambda m: "FlashInfer autotune"),
    _rule(r"flashinfer\.jit|Loading JIT ops|JIT-compil", COMPILING, detail=lambda m: "FlashInfer JIT"),
    # --- memory: profiling, then the KV cache it leaves ---
    _rule(r"Memory profiling takes ([\d.]+) seconds", KV_CACHE, detail=lambda m: "sizing the KV cache"),
    _rule(r"Available KV cache memory: ([\d.]+) GiB", KV_CACHE, detail=lambda m: f"{m[1]} GiB",
          facts=lambda m: {"kv_cache_gib": _num(m[1])}),
    _rule(r"Auto set \(([\d.]+)/[\d.]+\) GiB for KV cache", KV_CACHE, detail=lambda m: f"{m[1]} GiB",
          facts=lambda m: {"kv_cache_gib": _num(m[1])}),
    _rule(r"(\w+) KV cache size: ([\d,]+) tokens(?:, Maximum concurrency for ([\d,]+) tokens per request: "
          r"([\d.]+)x)?", KV_CACHE,
          detail=lambda m: f"{m[2]} tokens" + (f", {_num(m[4]):.1f}x requests of {m[3]}" if m[4] else ""),
          facts=lambda m: {"kv_cache_tokens": int(_num(m[2]))}),
    # --- CUDA graphs (a tqdm bar per batch kind), warm-up ---
    _rule(r"Capturing CUDA graph[^:]*?(?:\(([^)]*)\))?:\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+)", CUDA_GRAPHS,
          detail=lambda m: (f"{m[1]}: " if m[1] else "") + f"{m[3]}/{m[4]}", percent=lambda m: _num(m[2])),
    _rule(r"Graph capturing finished in ([\d.]+) secs?, took ([\d.]+) GiB", WARMING_UP,
          detail=lambda m: f"CUDA graphs captured in {_num(m[1]):.0f} s ({m[2]} GiB)",
          facts=lambda m: {"cuda_graphs_s": _num(m[1])}),
    _rule(r"JIT kernel warmup finished in ([\d.]+)s", WARMING_UP, detail=lambda m: "JIT kernels ready"),
    _rule(r"Warming up ([^.]+?)\.*$", WARMING_UP, detail=lambda m: m[1]),
    _rule(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s", API_SERVER,
          detail=lambda m: f"engine ready in {_num(m[1]):.0f} s", facts=lambda m: {"engine_s": _num(m[1])}),
)


class PhaseTracker:
    """Feed it the log as it grows (`feed`); `phase` is what the server is doing now and `facts`
    what it has said about itself (weights_gib, kv_cache_tokens, compile_s, ...)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.phase = Phase(STARTING, "starting vLLM", None, clock())
        self.facts: dict[str, float] = {}
        self._partial = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: str | bytes) -> Phase:
        """Take newly appended log text; lines end at \\n or \\r (tqdm redraws with \\r), and an
        unfinished last line waits for the rest."""
        text = self._decoder.decode(data) if isinstance(data, bytes) else data
        lines = re.split(r"\r\n|\r|\n", self._partial + text)
        self._partial = lines.pop()[-MAX_PARTIAL:]
        for line in lines:
            self.line(line)
        return self.phase

    def line(self, line: str) -> None:
        if self.phase.name == READY:
            return  # what follows readiness (requests, sleep, wake) is not a start phase
        line = ANSI.sub("", line).rstrip()
        for rule in RULES:
            m = rule.pattern.search(line)
            if m:
                self.facts.update(rule.facts(m))
                self._set(rule.phase, rule.detail(m), rule.percent(m))
                return

    def _set(self, name: str, detail: str, percent: float | None) -> None:
        since = self.phase.since if name == self.phase.name else self.clock()
        self.phase = Phase(name, detail, percent, since)
