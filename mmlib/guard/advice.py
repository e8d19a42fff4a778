"""What would fit the card instead, for `mm check`'s fix: from a prediction (guard.fit.Prediction)
and the model's shapes, the values to write, the most direct first."""
from __future__ import annotations

import math
from typing import Any

from mmlib.guard.calibration import HEADROOM, KV_BLOCK, MIN_FIT_CONTEXT
from mmlib.profiles.memory import GIB, gib


def advise(fp: Any, model: Any, share: float | None, memory: Any) -> tuple[tuple[str, str], ...]:
    """Values that would fit the card, the most direct first (for `mm check`'s fix)."""
    if fp.card is None or not fp.kv_per_token:
        return ()
    capacity, per_token = fp.card.capacity, fp.kv_per_token
    extra = model.shape.encoder_positions
    fixed = fp.awake_bytes - fp.parts.get("kv_cache", 0)
    room_tokens = max(0, capacity - HEADROOM - fixed) // per_token // KV_BLOCK * KV_BLOCK
    context = fp.context or MIN_FIT_CONTEXT
    out: list[tuple[str, str]] = []
    if room_tokens >= context + extra:
        if share is not None:
            outside = fp.awake_bytes - int(share * capacity)  # context, graphs beyond vLLM's estimate, compile reserve
            fit_share = math.floor((capacity - HEADROOM - outside) / capacity * 100) / 100
            out.append(("engine.gpu_memory_utilization", f"{fit_share:g}"))
        elif memory.kv_cache:
            out.append(("memory.kv_cache", f'"{math.floor(room_tokens * per_token / GIB * 100) / 100:g}GiB"'))
        elif not memory.kv_tokens and fp.sequences and room_tokens // (context + extra) < fp.sequences:
            out.append(("memory.sequences", str(room_tokens // (context + extra))))
        if share is None and not memory.kv_cache:
            out.append(("memory.kv_tokens", str(room_tokens // 1024 * 1024 or room_tokens)))
    elif room_tokens >= MIN_FIT_CONTEXT + extra:
        c = 1 << ((room_tokens - extra).bit_length() - 1)
        out.append(("memory.context" if share is None else "engine.max_model_len", str(c)))
    # fp8 halves the KV cache a token: at the same share, or in the room the card has
    want, have = (context + extra, fp.kv_tokens or 0) if share is not None else (fp.kv_tokens or 0, room_tokens)
    if fp.kv_dtype != "fp8" and have < want <= 2 * have:
        out.append(("engine.kv_cache_dtype", '"fp8"'))
    fp8 = model.shape.served_as("fp8")
    if fp8 is not model.shape and not model.shape.quant_method:
        saved = model.shape.weight_bytes() - fp8.weight_bytes()
        if (room_tokens * per_token + saved) // per_token >= MIN_FIT_CONTEXT + extra:
            out.append(("engine.quantization", '"fp8"'))
    if not out:
        out.append(("model", f"a smaller or more quantized model (weights alone take {gib(model.weights)} "
                             f"of {gib(capacity)})"))
    return tuple(out)
