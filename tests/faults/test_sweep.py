"""`mm bench --sweep` end to end on the fake vLLM (its `bench serve` too), where the server runs at
most two requests at once: the levels, the knee, the plot and the remembered value, in seconds."""
from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_mm

SWEEPY = 'env = { FAKE_MAX_RUNNING = "2", FAKE_TOKENS = "8", FAKE_TOKEN_DELAY = "0.01" }'


def test_sweep_through_mm_finds_the_servers_limit_and_remembers_it(fake_mm):
    fake_mm.add_profile("sweepy", extra=SWEEPY)
    fake_mm.mm("up", "sweepy", "--force")
    r = run_mm("bench", "sweepy", "--sweep", "--levels", "1,2,8", "--prompts", "16", "--output-len", "8",
               env={**fake_mm.env, "COLUMNS": "200"}, timeout=120)
    [path] = (Path(fake_mm.env["MM_RESULTS_DIR"]) / "sweepy").glob("*-sweep.json")
    doc = json.loads(path.read_text())
    assert doc["complete"] is True and list(doc["levels"]) == ["c1", "c2", "c8"]
    figures = {name: e["figures"] for name, e in doc["levels"].items()}
    assert all(f["completed"] == 16 and f["failed"] == 0 for f in figures.values())
    assert figures["c8"]["max_concurrent_requests"] == 8 and doc["levels"]["c8"]["params"]["warmups"] == 2
    # two at once at most: c=2 doubles c=1's throughput, c=8 adds little and waits for its first token
    assert figures["c2"]["output_throughput"] > 1.6 * figures["c1"]["output_throughput"]
    assert figures["c8"]["median_ttft_ms"] > 2 * figures["c1"]["median_ttft_ms"]
    assert doc["knee"]["concurrency"] in (2, 8) and doc["knee"]["ttft_climbs_at"] == 8
    assert path.with_suffix(".png").stat().st_size > 10_000 and doc["plot"] == path.with_suffix(".png").name
    out = r.stdout
    assert "concurrency sweep" in out and f"knee: c={doc['knee']['concurrency']}, the lowest concurrency" in out
    assert f"saved {path} and {path.with_suffix('.png')}" in out
    assert f"`mm batch sweepy` runs at concurrency {doc['knee']['concurrency']}" in out
    store = json.loads((Path(fake_mm.env["MM_HOME"]) / "state" / "best_concurrency.json").read_text())
    [entry] = store["setups"].values()
    assert entry["concurrency"] == doc["knee"]["concurrency"] and entry["result"] == str(path)
    assert entry["setup"]["profile"] == "sweepy" and entry["setup"]["vllm"] == "99.0.0"
    assert entry["source"] == "`mm bench sweepy --sweep`"
