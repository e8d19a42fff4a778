"""Will a profile fit its share of the GPU? An estimate from the model's config.json and safetensors
headers (no weights loaded, no vLLM, no torch), in vLLM's own terms:

    KV cache = total GPU memory x gpu_memory_utilization - weights - activation peak - overhead
    tokens   = KV cache / (layers x kv heads x head dim x 2 (K and V) x bytes per KV element)

and from the tokens, how many requests of max_model_len fit at once. Checked against what vLLM
0.26 printed on an H100 (tests/unit/test_fit.py): within a few percent.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mmlib.guard.modelinfo import (
    FLOAT_ST,
    ST_BYTES,
    Shape,
    model_max_len,
    safetensors_bytes,
    safetensors_files,
)
from mmlib.profiles.vllm_cmd import engine_int

GIB = 1 << 30

# --- the overhead vLLM keeps beside weights and KV cache ---------------------------------------------
# Calibrated on an H100 with vLLM 0.26 (the DEBUG log of its memory profiler, 2026-11-24), two models
# of different width served with defaults (max_num_batched_tokens 8192):
#   dummy-1.5b (hidden 1536, intermediate 8960):  weights 2.68 GiB, torch peak +0.56, non-torch +0.22
#   dummy-7b-awq (hidden 3584, intermediate 18944): weights 4.03 GiB, torch peak +1.08, non-torch +0.22
# and both times the KV cache came out a further 0.06 GiB short (its CUDA graph memory estimate).
# - "weights" as vLLM counts them include persistent buffers sized by the batch: the parameter bytes
#   alone are 2.58 and 3.81 GiB, and the gaps (0.094 and 0.219 GiB) are 8 bytes x hidden x 8192
#   tokens for both, i.e. about four 16-bit tensors of max_num_batched_tokens x hidden.
# - the activation peak of the profiling pass grows with max_num_batched_tokens: the MLP's gate/up
#   and activation outputs (3 x intermediate) plus two hidden-sized tensors a token, in 16 bits,
#   and ~0.1 GiB fixed (sampler, logits). Two runs fix the two numbers; runs with max_num_seqs 16 or
#   64 and max_model_len 4096 printed the same peak, so neither enters. Below 70 GiB cards vLLM
#   batches 2048 tokens by default, and the same formula is used there (an extrapolation).
# - non-torch memory (cuBLAS/NCCL workspaces) and the CUDA graph pool are constants.
BUFFER_BYTES_PER_HIDDEN = 8
ACTIVATION_FIXED = int(0.1027 * GIB)
NON_TORCH = int(0.22 * GIB)
CUDA_GRAPHS = int(0.06 * GIB)
KV_BLOCK = 16  # vLLM allocates KV in blocks of 16 tokens


def parse_size(text: str) -> int:
    """"12GiB", "12G", "12GB", "11000MiB", "12" (GiB) -> bytes. Binary throughout: a "12 GB" card
    has 12 GiB, as card makers mean it."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (write it like 12GiB or 11000MiB)")
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 3
    return int(float(m.group(1)) * (1 << (10 * power)))


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# --- the estimate ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    total: int  # GPU memory, bytes
    share: float
    weights: int
    weights_from: str  # "safetensors headers" or "config.json shapes"
    activation: int
    overhead: int  # non-torch, CUDA graphs and per-token buffers
    kv_per_token: int
    kv_dtype: str
    max_model_len: int | None
    max_num_seqs: int | None

    @property
    def budget(self) -> int:
        return math.ceil(self.total * self.share)

    @property
    def kv_cache(self) -> int:
        return self.budget - self.weights - self.activation - self.overhead

    @property
    def tokens(self) -> int:
        return max(0, self.kv_cache) // self.kv_per_token // KV_BLOCK * KV_BLOCK

    @property
    def concurrency(self) -> float | None:
        return self.tokens / self.max_model_len if self.max_model_len else None

    @property
    def fits(self) -> bool:
        return self.kv_cache > 0 and (self.max_model_len is None or self.tokens >= self.max_model_len)

    def share_needed(self, tokens: int) -> float:
        return (self.weights + self.activation + self.overhead + tokens * self.kv_per_token) / self.total

    def summary(self) -> str:
        head = (f"{gib(self.budget)} budget ({self.share:g} of {gib(self.total)}) - weights {gib(self.weights)} "
                f"- activations and overhead {gib(self.activation + self.overhead)} = KV cache {gib(self.kv_cache)}")
        if self.kv_cache <= 0:
            return head
        s = f"{head}: {self.tokens:,} tokens ({self.kv_dtype} KV, {self.kv_per_token:,} bytes a token)"
        if self.concurrency is not None:
            s += f", {self.concurrency:.1f} requests of {self.max_model_len:,} tokens at once"
        return s

    def remedies(self) -> list[str]:
        """What would fit, most direct first."""
        out = []
        if self.kv_cache > 0 and self.tokens >= 1024:
            out.append(f"max_model_len = {self.tokens // 1024 * 1024}")
        if not self.kv_dtype.startswith("fp8"):
            out.append(f'kv_cache_dtype = "fp8" (halves the KV cache per token: {self.tokens * 2:,} tokens)')
        want = self.max_model_len or KV_BLOCK
        share = self.share_needed(want)
        if share <= 0.95:
            out.append(f"gpu_memory_utilization = {math.ceil(share * 100) / 100:g}")
        else:
            out.append("a smaller or more quantized model (the weights alone take "
                       f"{self.weights / self.total:.0%} of the card)")
        return out


def activation_bytes(shape: Shape, batched_tokens: int) -> int:
    """The profiling pass's activation peak: the MLP's gate/up and activation outputs plus two
    hidden-sized tensors a token, in 16 bits, and a fixed part (sampler, logits)."""
    width = 3 * (shape.expert_intermediate or shape.intermediate) if shape.experts else 3 * shape.intermediate
    return int(2 * batched_tokens * (width + 2 * shape.hidden)) + ACTIVATION_FIXED


def kv_bytes(kv_cache_dtype: Any, dtype: str) -> tuple[str, float]:
    d = str(kv_cache_dtype or "auto").lower()
    if d.startswith("fp8") or d in ("int8", "fp8_e4m3", "fp8_e5m2"):
        return "fp8", 1
    if d == "auto":
        return ("fp32" if dtype == "float32" else "16-bit"), 2  # vLLM serves fp32 checkpoints in 16 bits
    return d, 2


def default_batched_tokens(total: int) -> int:
    """vLLM's default max_num_batched_tokens for `vllm serve`: 8192 on cards of 70 GiB and more."""
    return 8192 if total >= 70 * GIB else 2048


def hub_weight_bytes(parameter_counts: Mapping[str, int], float_bytes: int = 2) -> int:
    """Parameter bytes from the hub's safetensors headers ({"BF16": n, "I32": m}, as
    huggingface_hub's get_safetensors_metadata counts them), the way safetensors_bytes counts a
    local checkpoint: floating-point tensors at the served dtype's size, others as stored."""
    return int(sum(n * (float_bytes if dtype in FLOAT_ST else ST_BYTES.get(dtype, 2))
                   for dtype, n in parameter_counts.items()))


def estimate(engine: Mapping[str, Any], cfg: Mapping[str, Any], total: int,
             folder: Path | None = None, load_format: str | None = None,
             hub_counts: Mapping[str, int] | None = None) -> Fit | None:
    """The fit of a model (its config.json, and its folder for safetensors) under an [engine] table
    on a card of `total` bytes; None where the config lacks the shapes to say."""
    shape = Shape.from_config(cfg)
    if shape is None:
        return None
    dtype = str(engine.get("dtype", "auto")).lower()
    if dtype in ("auto", ""):
        dtype = shape.dtype
    kv_name, kv_size = kv_bytes(engine.get("kv_cache_dtype"), dtype)
    weights, source = None, "config.json shapes"
    files = safetensors_files(folder) if folder and (load_format or engine.get("load_format")) != "dummy" else None
    if files:
        weights = safetensors_bytes(files)
        source = "safetensors headers"
    if weights is None and hub_counts and (load_format or engine.get("load_format")) != "dummy":
        weights, source = hub_weight_bytes(hub_counts), "safetensors headers on the hub"
    if weights is None:
        weights, source = shape.weight_bytes(), "config.json shapes"
    batched = engine_int(engine.get("max_num_batched_tokens")) or default_batched_tokens(total)
    overhead = NON_TORCH + (0 if engine.get("enforce_eager") is True else CUDA_GRAPHS) \
        + BUFFER_BYTES_PER_HIDDEN * shape.hidden * batched
    max_len = engine_int(engine.get("max_model_len"))
    max_len = max_len if max_len and max_len > 0 else model_max_len(cfg)  # -1 and "auto": the model's own
    share = engine.get("gpu_memory_utilization", 0.9)
    return Fit(total=total, share=float(share), weights=weights, weights_from=source,
               activation=activation_bytes(shape, batched), overhead=overhead,
               kv_per_token=shape.kv_bytes_per_token(kv_size), kv_dtype=kv_name, max_model_len=max_len,
               max_num_seqs=engine_int(engine.get("max_num_seqs")))
