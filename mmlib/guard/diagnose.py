"""Known ways a vLLM server dies at start-up, matched against its log: each a pattern and a hint.

Data, not code: adding a failure is one entry. The log is read from its end, so the failure that
killed the server wins over anything printed in passing earlier; where one line matches several
entries, the one higher in the table wins (specific before general).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownFailure:
    id: str
    pattern: str
    hint: str


KNOWN_FAILURES: list[KnownFailure] = [
    KnownFailure("fp8-kv-fa3", r"For FP8 input, output must have dtype BF16",
                 "fp16 AWQ weights with fp8 KV cache on FlashAttention 3 (Hopper): set engine.dtype = \"bfloat16\""),
    KnownFailure("kv-too-small", r"To serve at least one request with the model's max seq len",
                 "the KV cache is smaller than one request of max_model_len: lower engine.max_model_len (vLLM's "
                 "estimate of what fits is in the line above), use kv_cache_dtype = \"fp8\", or raise "
                 "engine.gpu_memory_utilization (`mm check` estimates the fit)"),
    KnownFailure("no-kv-memory", r"No available memory for the cache blocks",
                 "weights and activations already fill the share: raise engine.gpu_memory_utilization, lower "
                 "engine.max_num_batched_tokens, or use a smaller or more quantized model (`mm check` estimates it)"),
    KnownFailure("gpu-busy", r"less than desired (GPU|CPU) memory utilization",
                 "something else holds GPU memory (`mm doctor` shows who): stop it, or lower "
                 "engine.gpu_memory_utilization to what is free"),
    KnownFailure("out-of-memory", r"CUDA out of memory|OutOfMemoryError|Insufficient memory",
                 "out of memory at warm-up: lower engine.max_model_len or engine.max_num_seqs, use "
                 "kv_cache_dtype = \"fp8\", or lower engine.gpu_memory_utilization (`mm check` estimates the fit)"),
    KnownFailure("max-len-over-model", r"User-specified max_model_len \(\d+\) is greater than the derived",
                 "engine.max_model_len is longer than the model's context: set it to the model's limit named "
                 "in the line above, or less"),
    KnownFailure("driver-too-old", r"driver on your system is too old|CUDA driver version is insufficient",
                 "the NVIDIA driver is older than this vLLM/torch build needs: update the driver (`mm doctor`)"),
    KnownFailure("no-gpu", r"No CUDA GPUs are available|Failed to infer device type|Found no NVIDIA driver",
                 "vLLM's CUDA build found no GPU: run `mm doctor`; on a machine without one, delete .venv "
                 "and run ./mm to get the CPU build"),
    KnownFailure("gated-repo", r"GatedRepoError|Access to model .* is restricted|401 Client Error",
                 "the model is gated: accept its licence on huggingface.co and set HF_TOKEN in [env] (or your shell)"),
    KnownFailure("remote-code", r"requires you to execute the (configuration|tokenizer) file",
                 "the model ships its own code: set engine.trust_remote_code = true if you trust its repository"),
    KnownFailure("architecture", r"Model architectures \[.*\] are not supported",
                 "this vLLM cannot serve the model's architecture: use a newer vLLM or another model"),
    KnownFailure("model-files", r"does not appear to have a file named|Can't load the configuration|"
                 r"is not a local folder and is not a valid model identifier|RepositoryNotFound|"
                 r"Invalid repository ID or local directory|No such file or directory",
                 "model files not found: check the profile's model (a local folder with config.json, or a hub id "
                 "you can download; set HF_TOKEN in [env] for gated models)"),
    KnownFailure("port-taken", r"Address already in use",
                 "the port is taken: remove `port` from the profile to let mm pick a free one"),
    KnownFailure("bad-argument", r"unrecognized arguments|error: argument",
                 "vLLM rejected an argument from [engine]: run `mm check` to see which, and the fix"),
    KnownFailure("no-sleep-mode", r"Sleep mode is not supported|sleep mode.*not supported",
                 "sleep mode is unavailable on this device: set [sleep] enabled = false"),
    KnownFailure("illegal-instruction", r"Illegal instruction|SIGILL",
                 "vLLM's CPU kernels need instructions this CPU lacks: run `mm doctor` and check the CPU build"),
]
_COMPILED = [(re.compile(f.pattern, re.IGNORECASE), f) for f in KNOWN_FAILURES]


@dataclass(frozen=True)
class Diagnosis:
    failure: KnownFailure
    line: str  # the log line that matched

    @property
    def hint(self) -> str:
        return self.failure.hint


def diagnose(lines: list[str]) -> Diagnosis | None:
    """The last known failure in the log lines, with the line it matched."""
    for line in reversed(lines):
        for pattern, failure in _COMPILED:
            if pattern.search(line):
                return Diagnosis(failure, line.strip())
    return None


def diagnose_log(path: Path | None, max_bytes: int = 512 * 1024) -> Diagnosis | None:
    """The same over a server's whole log (its last max_bytes): vLLM's engine prints the root cause
    and then the API server adds its own traceback, so the cause is often 30+ lines from the end."""
    if not path or not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
        text = f.read().decode(errors="replace")
    return diagnose(text.splitlines())


def hint_for(lines: list[str]) -> str | None:
    found = diagnose(lines)
    return found.hint if found else None
