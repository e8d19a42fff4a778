"""The concurrency sweep (`mm bench --sweep`): throughput and latency against concurrency for one
profile's server, the knee, and the best concurrency remembered for batch work (`mm batch`).

(A placeholder for the interface `mm batch` calls; the sweep itself lands with issue 23.)"""
from __future__ import annotations

from typing import Any

DEFAULT_CONCURRENCY = 32  # before any sweep of the profile was measured


def best_concurrency(profile: Any, server: dict[str, Any], quick_sweep: bool = True,
                     ui: Any = None) -> tuple[int, str]:
    """The concurrency batch work runs at for `profile`, served as `server` (cli/bench.serve's
    snapshot: its "endpoint", "api_key", ...): the best one a sweep measured, remembered per profile,
    model, vLLM version and card; else, with quick_sweep, a short sweep run now and remembered; else
    DEFAULT_CONCURRENCY. Returns (concurrency, a few words saying where it came from)."""
    return DEFAULT_CONCURRENCY, "mm's default (no sweep measured yet)"
