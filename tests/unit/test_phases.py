"""Start phases from vLLM's log: a real CPU start (tests/fixtures/vllm-cpu-start.log, vLLM 0.32 through
`mm up default`) and GPU lines built from vLLM 0.32's own log strings (file:line in each comment)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmlib.serve import phases
from mmlib.serve.phases import Phase, PhaseTracker

CPU_LOG = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-cpu-start.log"
W = "(Worker_TP0 pid=2211) INFO 11-25 09:14:{:02d} "
E = "(EngineCore_DP0 pid=2100) INFO 11-25 09:14:{:02d} "
A = "(APIServer pid=2001) INFO 11-25 09:14:{:02d} "
GPU_START = [
    (A + "[model.py:733] Resolved architecture: Qwen2ForCausalLM", "initializing", None),
    (E + "[core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: model='Qwen/Qwen2.5-7B-Instruct-AWQ', "
         "speculative_config=None", "initializing", None),
    # gpu_model_runner.py:5040
    (W + "[gpu_model_runner.py:5040] Starting to load model Qwen/Qwen2.5-7B-Instruct-AWQ...", "loading weights", None),
    # weight_utils.py:533 (vLLM downloads without a progress bar and says so afterwards)
    (W + "[weight_utils.py:533] Time spent downloading weights for Qwen/Qwen2.5-7B-Instruct-AWQ: 212.451210 seconds",
     "loading weights", None),
    # weight_utils.py:837 _BAR_FORMAT, desc from weight_utils.py:1094
    ("Loading safetensors checkpoint shards:   0% Completed | 0/2 [00:00<?, ?it/s]", "loading weights", 0.0),
    ("Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01,  1.20s/it]", "loading weights", 50.0),
    ("Loading safetensors checkpoint shards: 100% Completed | 2/2 [00:02<00:00,  1.10s/it]", "loading weights", 100.0),
    (W + "[default_loader.py:502] Loading weights took 2.31 seconds", "loading weights", 100.0),
    (W + "[gpu_model_runner.py:5150] Model loading took 5.2147 GiB memory and 3.204718 seconds", "profiling memory",
     None),
    (W + "[monitor.py:40] Starting torch.compile", "compiling", None),
    (W + "[backends.py:1167] Dynamo bytecode transform time: 6.21 s", "compiling", None),
    (W + "[backends.py:399] Compiling a graph for compile range (1, 8192) takes 21.43 s", "compiling", None),
    (W + "[monitor.py:62] torch.compile took 29.87 s in total", "profiling memory", None),
    (W + "[gpu_worker.py:760] Available KV cache memory: 4.31 GiB", "KV cache", None),
    (E + "[kv_cache_utils.py:2328] GPU KV cache size: 80,688 tokens, Maximum concurrency for 16,384 tokens per "
         "request: 4.92x", "KV cache", None),
    (W + "[kernel_warmup.py:176] JIT kernel warmup starting.", "compiling", None),
    (W + "[kernel_warmup.py:368] Running FlashInfer autotune with 8192 tokens and token buckets [1, 2, 4].",
     "compiling", None),
    (W + "[kernel_warmup.py:190] JIT kernel warmup finished in 14.02s.", "warming up", None),
    # gpu_model_runner.py:6657, a tqdm bar
    ("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  45%|████▍     | 30/67 [00:03<00:04,  8.91it/s]",
     "capturing CUDA graphs", 45.0),
    ("Capturing CUDA graphs (decode, FULL): 100%|██████████| 35/35 [00:02<00:00, 14.2it/s]", "capturing CUDA graphs",
     100.0),
    (W + "[gpu_model_runner.py:6582] Graph capturing finished in 7 secs, took 0.45 GiB", "warming up", None),
    (E + "[core.py:403] init engine (profile, create kv cache, warmup model) took 58.12 s", "starting API server",
     None),
    (A + "[entry.py:140] Starting vLLM server on http://127.0.0.1:41231", "ready", None),
]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_real_cpu_start_goes_through_its_phases():
    clock = Clock()
    t = PhaseTracker(clock)
    names = []
    for line in CPU_LOG.read_bytes().splitlines(keepends=True):
        clock.t += 1
        if t.feed(line).name != (names[-1] if names else None):
            names.append(t.phase.name)
    assert names == ["starting", "initializing", "loading weights", "KV cache", "starting API server", "ready"]
    assert t.phase.detail.startswith("http://127.0.0.1:")
    assert t.facts == {"load_s": 2.37, "kv_cache_gib": 1.29, "kv_cache_tokens": 59904, "engine_s": 7.35}


def test_the_cpu_log_shows_shard_progress_and_the_kv_cache_size():
    t = PhaseTracker()
    seen = []
    for line in CPU_LOG.read_text().splitlines(keepends=True):
        seen.append(t.feed(line))
    loading = [p for p in seen if p.name == "loading weights" and p.percent is not None]
    assert sorted({p.percent for p in loading}) == [0.0, 100.0]
    assert [p.detail for p in loading if p.percent == 100.0][0] == "shard 1/1"
    kv = [p for p in seen if p.name == "KV cache"]
    assert kv[-1].detail == "59,904 tokens, 14.6x requests of 4,096"


@pytest.mark.parametrize("line,name,percent", GPU_START, ids=[f"{i:02d}-{g[1]}" for i, g in enumerate(GPU_START)])
def test_gpu_lines_from_vllm_source(line, name, percent):
    t = PhaseTracker()
    t.feed(line.format(7) + "\n")
    assert (t.phase.name, t.phase.percent) == (name, percent)


def test_a_gpu_start_in_order_and_its_facts():
    t = PhaseTracker()
    for i, (line, name, percent) in enumerate(GPU_START):
        t.feed(line.format(i) + "\n")
        assert t.phase.name == name, line
    assert t.facts == {"download_s": 212.45121, "load_s": 2.31, "weights_gib": 5.2147, "compile_s": 29.87,
                       "kv_cache_gib": 4.31, "kv_cache_tokens": 80688, "cuda_graphs_s": 7.0, "engine_s": 58.12}


def test_since_marks_the_start_of_a_phase_not_of_its_updates():
    clock = Clock()
    t = PhaseTracker(clock)
    clock.t = 1010
    t.feed("Capturing CUDA graphs (decode, FULL):  10%|█         | 3/35 [00:00<00:04,  7.1it/s]\n")
    clock.t = 1015
    t.feed("Capturing CUDA graphs (decode, FULL):  50%|█████     | 17/35 [00:02<00:02,  7.1it/s]\n")
    assert t.phase == Phase("capturing CUDA graphs", "decode, FULL: 17/35", 50.0, 1010)
    assert t.phase.to_dict() == {"name": "capturing CUDA graphs", "detail": "decode, FULL: 17/35", "percent": 50.0,
                                 "since": 1010}


def test_partial_lines_wait_and_carriage_returns_end_lines():
    t = PhaseTracker()
    t.feed("(Worker pid=1) INFO 11-25 09:14:01 [default_loader.py:502] Loading weig")
    assert t.phase.name == "starting"  # half a line is not read yet
    t.feed("hts took 2.31 seconds\n")
    assert t.phase.detail == "loaded in 2.3 s"
    # tqdm redraws a bar in place: \r ends each state of it
    t.feed("\rCapturing CUDA graphs (decode, FULL):  20%|██ | 7/35\rCapturing CUDA graphs (decode, FULL):  40%|████ | 14/35\r")
    assert t.phase.percent == 40.0


def test_bytes_split_inside_a_utf8_character_decode_whole():
    t = PhaseTracker()
    line = "Capturing CUDA graphs (decode, FULL):  45%|████▍     | 16/35 [00:03<00:04,  8.91it/s]\n".encode()
    cut = line.index("█".encode()) + 1  # in the middle of a 3-byte character
    t.feed(line[:cut])
    t.feed(line[cut:])
    assert t.phase.percent == 45.0 and t.phase.detail == "decode, FULL: 16/35"


def test_ready_is_final_and_unknown_lines_change_nothing():
    t = PhaseTracker()
    t.feed("INFO:     Application startup complete.\n")
    assert t.phase.name == phases.READY
    t.feed("(Worker pid=1) INFO 11-25 09:14:01 [default_loader.py:502] Loading weights took 2.31 seconds\n")
    assert t.phase.name == phases.READY
    other = PhaseTracker()
    other.feed("some line vLLM may print one day\n\x1b[32mINFO\x1b[0m nothing to see\n")
    assert other.phase.name == phases.STARTING


def test_downloads_shown_by_hub_progress_bars():
    t = PhaseTracker()
    t.feed("model-00001-of-00002.safetensors:  37%|███▋      | 1.85G/5.00G [00:41<01:10, 44.7MB/s]\n")
    assert (t.phase.name, t.phase.percent) == ("downloading", 37.0)
