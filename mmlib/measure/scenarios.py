"""The load `mm bench` puts on a server: named scenarios (the seed's latency, burst and heavy, plus
c10), and the plan that turns one into the numbers handed to `vllm bench serve` (--quick, --full, and
the CPU build's smaller quick runs)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from mmlib.errors import MMError

QUICK, FULL = "quick", "full"
# On a CPU build --quick divides token lengths by this and caps the prompts, so a quick run of the
# embedded model finishes in about half a minute per scenario on 2 cores (vLLM's bench start
# included); the result records what actually ran.
CPU_QUICK_LENGTH_DIVISOR = 8
CPU_QUICK_MAX_PROMPTS = 8
@dataclass(frozen=True)
class Scenario:
    name: str
    input_len: int
    output_len: int
    quick_prompts: int
    full_prompts: int
    request_rate: float | None = None  # requests per second; None sends all at once
    max_concurrency: int | None = None

    def describe(self) -> str:
        load = f"request rate {self.request_rate:g}/s" if self.request_rate else f"{self.max_concurrency} concurrent"
        return f"{load}, {self.input_len} in / {self.output_len} out"


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("latency", 256, 256, quick_prompts=10, full_prompts=120, request_rate=1.0),
    Scenario("c10", 256, 256, quick_prompts=30, full_prompts=300, max_concurrency=10),
    Scenario("burst", 128, 256, quick_prompts=50, full_prompts=500, max_concurrency=50),
    Scenario("heavy", 512, 512, quick_prompts=100, full_prompts=1000, max_concurrency=100),
)}


@dataclass(frozen=True)
class Plan:
    """One scenario as it will run: the numbers handed to `vllm bench serve`."""
    scenario: str
    prompts: int
    input_len: int
    output_len: int
    request_rate: float | None
    max_concurrency: int | None
    warmups: int
    scaled_for_cpu: bool = False

    def params(self) -> dict[str, Any]:
        return asdict(self)


def plan(names: Sequence[str], mode: str, cpu: bool, prompts: int | None = None,
         input_len: int | None = None, output_len: int | None = None) -> list[Plan]:
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise MMError(f"unknown scenario '{unknown[0]}' (fix: one of {', '.join(SCENARIOS)})")
    out = []
    for name in dict.fromkeys(names or SCENARIOS):  # keeps the order given, drops repeats
        s = SCENARIOS[name]
        n, i, o = (s.quick_prompts if mode == QUICK else s.full_prompts), s.input_len, s.output_len
        scaled = cpu and mode == QUICK
        if scaled:
            n, i, o = min(n, CPU_QUICK_MAX_PROMPTS), i // CPU_QUICK_LENGTH_DIVISOR, o // CPU_QUICK_LENGTH_DIVISOR
        out.append(Plan(name, prompts or n, input_len or i, output_len or o, s.request_rate, s.max_concurrency,
                        warmups=0 if mode == QUICK else 2, scaled_for_cpu=scaled))
    return out
