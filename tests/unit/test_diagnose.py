"""Matching a dead server's log against known start-up failures: every entry has a log line that
triggers it, a healthy vLLM log triggers none, and the failure that killed the server wins."""
from __future__ import annotations

import pytest

from mmlib.guard import diagnose

# One real-looking line per known failure (the FP8 one as vLLM 0.26 printed it on an H100).
SAMPLES = {
    "fp8-kv-fa3": "(EngineCore pid=1239) RuntimeError: For FP16/BF16 input, output must have the same dtype as "
                  "inputs. For FP8 input, output must have dtype BF16",
    "kv-too-small": "ValueError: To serve at least one request with the model's max seq len (32768), (3.5 GiB KV "
                    "cache is needed, which is larger than the available KV cache memory (1.2 GiB). Based on the "
                    "available memory, the estimated maximum model length is 11200.",
    "no-kv-memory": "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`",
    "gpu-busy": "ValueError: Free memory on device cuda:0 (2.1/11.6 GiB) on startup is less than desired GPU memory "
                "utilization (0.85, 9.9 GiB).",
    "out-of-memory": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.02 GiB.",
    "max-len-over-model": "ValueError: User-specified max_model_len (65536) is greater than the derived "
                          "max_model_len (max_position_embeddings=32768 or model_max_length=None in model's "
                          "config.json).",
    "driver-too-old": "RuntimeError: The NVIDIA driver on your system is too old (found version 12020).",
    "no-gpu": "RuntimeError: Failed to infer device type, please set the environment variable VLLM_LOGGING_LEVEL",
    "gated-repo": "huggingface_hub.errors.GatedRepoError: 401 Client Error. Access to model meta-llama/Llama-3.1-8B "
                  "is restricted.",
    "remote-code": "ValueError: The repository for x/y contains custom code which requires you to execute the "
                   "configuration file in that repo on your local machine.",
    "architecture": "ValueError: Model architectures ['FooForCausalLM'] are not supported for now.",
    "model-files": "OSError: /models/missing does not appear to have a file named config.json.",
    "port-taken": "OSError: [Errno 98] Address already in use",
    "bad-argument": "vllm serve: error: unrecognized arguments: --max-modle-len 8192",
    "no-sleep-mode": "ValueError: Sleep mode is not supported on current platform.",
    "illegal-instruction": "Fatal Python error: Illegal instruction",
}

# Lines of a healthy start (vLLM 0.26, H100): the engine's config dump says trust_remote_code=False.
HEALTHY = [
    "(EngineCore pid=782) INFO 11-24 22:25:25 [v1/engine/core.py:116] Initializing a V1 LLM engine (v0.26.0) with "
    "config: model='.gpu-stage/models/dummy-1.5b', speculative_config=None, tokenizer='.gpu-stage/models/dummy-1.5b', "
    "skip_tokenizer_init=False, tokenizer_mode=auto, revision=None, tokenizer_revision=None, trust_remote_code=False, "
    "dtype=torch.bfloat16, max_seq_len=32768, download_dir=None",
    "(APIServer pid=1105) WARNING 11-24 22:26:37 [utils/system_utils.py:299] Found ulimit of 20000 and failed to "
    "automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors like "
    "`OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n",
    "(EngineCore pid=782) INFO 11-24 22:25:31 [platforms/cuda.py:482] Using FLASH_ATTN attention backend out of "
    "potential backends: ['FLASH_ATTN', 'FLASHINFER', 'TRITON_ATTN', 'FLEX_ATTENTION'].",
    "(EngineCore pid=782) INFO 11-24 22:25:33 [v1/worker/gpu/model_runner.py:305] Model loading took 2.68 GiB and "
    "3.340176 seconds",
    "(EngineCore pid=782) INFO 11-24 22:26:01 [v1/worker/gpu_worker.py:560] Available KV cache memory: 6.43 GiB",
    "(EngineCore pid=782) INFO 11-24 22:26:01 [v1/core/kv_cache_utils.py:2177] GPU KV cache size: 240,816 tokens",
    "(APIServer pid=1) INFO: Application startup complete.",
]

# The end of the log of the fp16 AWQ + fp8 KV server that died on the H100 (vLLM 0.26).
FP8_CRASH = [
    "(EngineCore pid=1239) INFO 11-24 22:27:48 [v1/core/kv_cache_utils.py:2177] GPU KV cache size: 170,784 tokens",
    "(EngineCore pid=1239) ERROR 11-24 22:27:48 [v1/engine/core.py:1330] EngineCore failed to start.",
    "(EngineCore pid=1239) ERROR 11-24 22:27:48 [v1/engine/core.py:1330] Traceback (most recent call last):",
    '(EngineCore pid=1239)   File "/tmp/site/vllm/v1/attention/backends/flash_attn.py", line 1014, in forward',
    "(EngineCore pid=1239)     flash_attn_varlen_func(",
    '(EngineCore pid=1239)   File "/tmp/site/vllm/vllm_flash_attn/flash_attn_interface.py", line 347, in '
    "flash_attn_varlen_func",
    "(EngineCore pid=1239)     out, softmax_lse, _, _ = torch.ops._vllm_fa3_C.fwd(",
    SAMPLES["fp8-kv-fa3"],
    "[rank0]:[W1124 22:27:50.793875474 ProcessGroupNCCL.cpp:1575] Warning: WARNING: destroy_process_group() was not "
    "called before program exit, which can leak resources.",
]


def test_every_known_failure_has_a_sample():
    assert {f.id for f in diagnose.KNOWN_FAILURES} == set(SAMPLES)


@pytest.mark.parametrize("failure_id", sorted(SAMPLES))
def test_each_failure_is_recognised(failure_id):
    found = diagnose.diagnose(HEALTHY + [SAMPLES[failure_id]])
    assert found is not None and found.failure.id == failure_id
    assert found.line == SAMPLES[failure_id]
    assert diagnose.hint_for([SAMPLES[failure_id]]) == found.hint


def test_a_healthy_log_matches_nothing():
    assert diagnose.diagnose(HEALTHY) is None
    assert diagnose.hint_for(HEALTHY) is None


def test_the_fp8_crash_of_the_h100_run():
    found = diagnose.diagnose(FP8_CRASH)
    assert found.failure.id == "fp8-kv-fa3" and 'engine.dtype = "bfloat16"' in found.hint


def test_the_failure_nearest_the_end_wins():
    lines = ["ls: cannot access '/usr/local/cuda': No such file or directory", *HEALTHY, SAMPLES["port-taken"]]
    assert diagnose.diagnose(lines).failure.id == "port-taken"


def test_on_one_line_the_specific_failure_wins():
    line = "torch.OutOfMemoryError: CUDA out of memory while checking: No available memory for the cache blocks"
    assert diagnose.diagnose([line]).failure.id == "no-kv-memory"


def test_diagnose_log_reads_past_the_api_servers_traceback(tmp_path):
    log = tmp_path / "perf.log"
    api_traceback = [f'(APIServer pid=1)   File "/x/api_server.py", line {i}, in run' for i in range(40)]
    log.write_text("\n".join(HEALTHY + FP8_CRASH + api_traceback +
                             ["RuntimeError: Engine core initialization failed. See root cause above."]) + "\n")
    assert diagnose.hint_for(log.read_text().splitlines()[-15:]) is None  # a 15-line tail misses it
    found = diagnose.diagnose_log(log)
    assert found.failure.id == "fp8-kv-fa3" and "For FP8 input" in found.line
    assert diagnose.diagnose_log(tmp_path / "missing.log") is None
    assert diagnose.diagnose_log(None) is None
