"""A profile's [memory] table: what its server needs, in tokens or bytes, instead of a share of the card.

    [memory]
    context = 8192          # tokens one request may hold (vLLM's max_model_len), or "fit"
    sequences = 16          # requests at once (max_num_seqs; also the CUDA-graph capture size)
    kv_tokens = 131072      # the KV cache in tokens (default: sequences x context) ...
    # kv_cache = "4GiB"     # ... or in bytes, or "fill": what the card has left
    # offload = "16GiB"     # RAM for KV blocks vLLM offloads to the host, or "fit"

guard/fit.py turns this into exact vLLM flags for a card (--kv-cache-memory-bytes and friends);
this module only reads and validates the table, and knows sizes ("12GiB"), so profiles and config
need nothing from guard.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from mmlib.errors import ProfileError

GIB = 1 << 30
FILL, FIT = "fill", "fit"

# Engine keys that [memory] decides; setting both would leave two answers to one question.
OWNED_ENGINE_KEYS = {"max_model_len": "context", "max_num_seqs": "sequences", "kv_cache_memory_bytes": "kv_cache"}
MAX_SEQUENCES = 4096
MIN_CONTEXT = 16


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


def token_count(value: Any) -> int | None:
    """16384, "16k", "128K" -> tokens (binary k: 16k is 16384, as context lengths are meant)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kK])?\s*", str(value))
    return int(m.group(1)) * (1024 if m.group(2) else 1) if m else None


@dataclass(frozen=True)
class MemorySpec:
    context: int | None = None      # None: "fit" (the longest the model and the KV cache allow)
    sequences: int | None = None    # None: DEFAULT_SEQUENCES
    kv_tokens: int | None = None
    kv_cache: int | None = None     # bytes
    kv_fill: bool = False           # the KV cache takes what the card has left
    offload: int | None = None      # bytes of host RAM for offloaded KV blocks
    offload_fit: bool = False

    @property
    def context_fit(self) -> bool:
        return self.context is None

    def to_table(self) -> dict[str, Any]:
        """As written in TOML (what `mm profiles show` prints)."""
        out: dict[str, Any] = {"context": self.context if self.context else FIT}
        if self.sequences:
            out["sequences"] = self.sequences
        if self.kv_tokens:
            out["kv_tokens"] = self.kv_tokens
        if self.kv_cache or self.kv_fill:
            out["kv_cache"] = FILL if self.kv_fill else f"{self.kv_cache / GIB:g}GiB"
        if self.offload or self.offload_fit:
            out["offload"] = FIT if self.offload_fit else f"{self.offload / GIB:g}GiB"
        return out


KEYS = ("context", "sequences", "kv_tokens", "kv_cache", "offload")


def _size(file: str, key: str, value: Any, word: str) -> tuple[int | None, bool]:
    """(bytes, is_word) for a size key that also takes `word` ("fill" or "fit")."""
    if value == word:
        return None, True
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, False
    if isinstance(value, str):
        try:
            n = parse_size(value)
        except ValueError:
            n = 0
        if n > 0:
            return n, False
    raise ProfileError(file, f"expected a size such as \"4GiB\" or \"{word}\", got {value!r}"[:200],
                       f'set memory.{key} = "4GiB" (or "{word}")', key=f"memory.{key}")


def _count(file: str, key: str, value: Any, low: int, high: int, example: str) -> int:
    n = token_count(value)
    if n is None or not low <= n <= high:
        raise ProfileError(file, f"expected a count {low}-{high:,}, got {value!r}"[:200],
                           f"set memory.{key} = {example}", key=f"memory.{key}")
    return n


def parse_memory(file: str, table: Any, engine: Mapping[str, Any]) -> MemorySpec:
    """The [memory] table, checked: one-line ProfileErrors naming the key and the fix."""
    if not isinstance(table, dict):
        raise ProfileError(file, "expected a table [memory]", "write it as [memory] with keys below", key="memory")
    import difflib

    for key in table:
        if key not in KEYS:
            hint = difflib.get_close_matches(str(key), KEYS, n=1)
            raise ProfileError(file, "unknown key", f"did you mean 'memory.{hint[0]}'?" if hint
                               else f"known keys: {', '.join(KEYS)}", key=f"memory.{key}")
    for ekey, mkey in OWNED_ENGINE_KEYS.items():
        if ekey in engine:
            raise ProfileError(file, f"[memory] decides it (memory.{mkey}); two answers to one question",
                               f"remove engine.{ekey} and set memory.{mkey}", key=f"engine.{ekey}")
    context = table.get("context", FIT)
    context = None if context == FIT else _count(file, "context", context, MIN_CONTEXT, 10 << 20, '8192 (or "fit")')
    sequences = table.get("sequences")
    sequences = None if sequences is None else _count(file, "sequences", sequences, 1, MAX_SEQUENCES, "16")
    kv_tokens = table.get("kv_tokens")
    kv_tokens = None if kv_tokens is None else _count(file, "kv_tokens", kv_tokens, MIN_CONTEXT, 1 << 30, "131072")
    kv_cache, kv_fill = _size(file, "kv_cache", table["kv_cache"], FILL) if "kv_cache" in table else (None, False)
    if kv_tokens is not None and "kv_cache" in table:
        raise ProfileError(file, "kv_tokens and kv_cache both size the KV cache", "keep one of them",
                           key="memory.kv_cache")
    if kv_tokens is not None and context is not None and kv_tokens < context:
        raise ProfileError(file, f"{kv_tokens:,} tokens cannot hold one request of context = {context:,}; "
                           "vLLM refuses to start", f"set memory.kv_tokens = {context} or more, or lower context",
                           key="memory.kv_tokens")
    offload, offload_fit = _size(file, "offload", table["offload"], FIT) if "offload" in table else (None, False)
    if "offload" in table and "kv_offloading_size" in engine:
        raise ProfileError(file, "[memory] decides it (memory.offload); two answers to one question",
                           "remove engine.kv_offloading_size and keep memory.offload", key="engine.kv_offloading_size")
    return MemorySpec(context=context, sequences=sequences, kv_tokens=kv_tokens, kv_cache=kv_cache,
                      kv_fill=kv_fill, offload=offload, offload_fit=offload_fit)
