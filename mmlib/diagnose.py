"""Known ways a vLLM server dies at start-up, matched against its log: each a pattern and a hint.

Data, not code: adding a failure is one entry.
"""
from __future__ import annotations

import re

KNOWN_FAILURES: list[tuple[str, str]] = [
    (r"CUDA out of memory|OutOfMemoryError|No available memory for the cache blocks|"
     r"less than desired (GPU|CPU) memory utilization|Insufficient memory",
     "out of memory at warm-up: lower engine.max_model_len or engine.max_num_seqs, use "
     "kv_cache_dtype = \"fp8\", or lower engine.gpu_memory_utilization (`mm check` estimates the fit)"),
    (r"For FP8 input, output must have dtype BF16",
     "fp16 AWQ weights with fp8 KV cache on FlashAttention 3 (Hopper): set engine.dtype = \"bfloat16\""),
    (r"(No such file or directory|does not appear to have a file named|Can't load the configuration|"
     r"is not a local folder and is not a valid model identifier|RepositoryNotFound|"
     r"Invalid repository ID or local directory)",
     "model files not found: check the profile's model (a local folder with config.json, or a hub id "
     "you can download; set HF_TOKEN in [env] for gated models)"),
    (r"Address already in use",
     "the port is taken: remove `port` from the profile to let mm pick a free one"),
    (r"unrecognized arguments|error: argument",
     "vLLM rejected an argument from [engine]: run `mm check` to see which, and the fix"),
    (r"Sleep mode is not supported|sleep mode.*not supported",
     "sleep mode is unavailable on this device: set [sleep] enabled = false"),
]
_COMPILED = [(re.compile(p, re.IGNORECASE), hint) for p, hint in KNOWN_FAILURES]


def hint_for(lines: list[str]) -> str | None:
    text = "\n".join(lines)
    for pattern, hint in _COMPILED:
        if pattern.search(text):
            return hint
    return None
