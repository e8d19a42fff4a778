"""`mm bench --sweep` on real vLLM (CPU, the embedded model, the session's server): a tiny sweep
through mm's endpoint writes its result and plot and remembers the knee for `mm batch`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_a_tiny_sweep_writes_json_and_png_and_remembers_the_knee(live_mm, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    r = live_mm.mm("bench", "--sweep", "--quick", "--levels", "1,4", "--prompts", "4", timeout=300)
    [path] = (Path(live_mm.env["MM_RESULTS_DIR"]) / "default").glob("*-sweep.json")
    doc = json.loads(path.read_text())
    assert doc["kind"] == "sweep" and doc["complete"] is True and doc["server"]["endpoint"] == live_mm.proxy
    assert list(doc["levels"]) == ["c1", "c4"]
    for c in (1, 4):
        entry = doc["levels"][f"c{c}"]
        fig = entry["figures"]
        assert entry["params"]["max_concurrency"] == c and entry["params"]["scaled_for_cpu"]
        assert fig["completed"] == 4 and fig["failed"] == 0 and fig["output_throughput"] > 0
        assert fig["median_ttft_ms"] > 0 and fig["median_tpot_ms"] > 0 and fig["request_throughput"] > 0
    assert fig["max_concurrent_requests"] > 1  # c=4 had several requests in flight
    knee = doc["knee"]["concurrency"]
    assert knee in (1, 4) and doc["knee"]["best_output_throughput"] >= doc["knee"]["output_throughput"]
    png = path.with_suffix(".png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert f"knee: c={knee}" in r.stdout and f"saved {path} and {png}" in r.stdout
    store = json.loads((Path(live_mm.env["MM_HOME"]) / "state" / "best_concurrency.json").read_text())
    [entry] = [e for e in store["setups"].values() if e["setup"]["profile"] == "default"]
    assert entry["concurrency"] == knee and entry["setup"]["vllm"] == doc["vllm"]["version"]
    assert entry["setup"]["model"] == doc["server"]["model"] and entry["result"] == str(path)
