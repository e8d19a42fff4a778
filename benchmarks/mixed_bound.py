"""How close to one model's throughput issue 11's mixed load can come with one model awake at a time:
a model of the load, not a measurement, run against every switching rule in a grid.

The load is benchmarks/mixed_load.py's: N clients in a closed loop, each request 64 tokens from the big
model (share p) or the small one. The GPU serves one model at a time; a decode step of b requests
takes step(b) = a + k*b seconds (memory-bound: near constant in b), calibrated so that N requests
take the measured single-model time. A switch costs S seconds and may start only once the awake
model has nothing in flight (vLLM sleeps an idle server; pausing the batch costs a recompute and a
second switch, which the H200 run measured as worse). The rules tried: switch when the other model's
oldest waiter has waited W (any W in the grid), or at once when its waiters reach F times the awake
model's running requests, or when the awake model runs dry; no new request is admitted once a switch
is decided. The best ratio of output tokens/s to the single-model run is printed for the measured S
and for S = 0 (a free switch): what no such rule can beat under this load.

Usage: python3 benchmarks/mixed_bound.py [--single-tok-s 2129 --switch-s 0.24 --clients 32] [--out FILE]
(defaults: the no-pause run of benchmark_results/mixed_load_h200_nopause.txt)
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

TOKENS = 64


def simulate(p_big: float, hold_s: float, ratio_k: float | None, switch_s: float, step_a: float, step_k: float,
             small_speed: float, clients: int, seconds: float = 120.0, seed: int = 1) -> float:
    """Output tokens/s of one rule over `seconds` of the closed loop."""
    rnd = random.Random(seed)
    pick = lambda: "big" if rnd.random() < p_big else "small"  # noqa: E731
    state = [["wait", pick(), 0.0, 0] for _ in range(clients)]  # phase, model, since, tokens left
    awake, t, out, deciding = "big", 0.0, 0, False
    while t < seconds:
        if not deciding:
            for c in state:
                if c[0] == "wait" and c[1] == awake:
                    c[0], c[3] = "run", TOKENS
        running = [c for c in state if c[0] == "run"]
        others = [c for c in state if c[0] == "wait" and c[1] != awake]
        if others and not deciding:
            oldest = min(c[2] for c in others)
            deciding = (not running or t - oldest >= hold_s
                        or (ratio_k is not None and len(others) >= ratio_k * len(running)))
        if deciding and not running:
            t += switch_s
            awake, deciding = ("small" if awake == "big" else "big"), False
            continue
        if not running:
            t += 0.001
            continue
        step = step_a + step_k * len(running)
        t += step if awake == "big" else step / small_speed
        for c in running:
            c[3] -= 1
            out += 1
            if c[3] == 0:
                c[0], c[1], c[2] = "wait", pick(), t
    return out / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--single-tok-s", type=float, default=2129.0, help="the measured single-model tok/s")
    ap.add_argument("--switch-s", type=float, default=0.24, help="the measured switch, to first token")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    # calibrate: N requests of 64 tokens take N*64/tok_s; a step's fixed part 90% of it (memory-bound)
    step = args.clients / args.single_tok_s
    step_a, step_k = 0.9 * step, 0.1 * step / args.clients
    single = simulate(1.0, 1.0, None, args.switch_s, step_a, step_k, 1.0, args.clients)
    lines = [f"# benchmarks/mixed_bound.py, {time.strftime('%Y-%m-%d %H:%M')}: a model of the load, not a measurement",
             f"# calibration: single {args.single_tok_s:.0f} tok/s at {args.clients} clients (a step {step * 1000:.1f} ms), "
             f"switch {args.switch_s:.2f} s; the model's own single run: {single:.0f} tok/s"]
    holds = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    ks = (None, 0.25, 0.5, 1.0, 2.0, 4.0)
    for small_speed in (1.0, 2.5):
        for label, p_big in (("50/50", 0.5), ("90/10", 0.9)):
            for switch_s in (args.switch_s, 0.0):
                best = max(((simulate(p_big, h, k, switch_s, step_a, step_k, small_speed, args.clients) / single, h, k)
                            for h in holds for k in ks), key=lambda r: r[0])
                lines.append(f"mix={label} small_speed={small_speed:g}x switch_s={switch_s:.2f} best_ratio={best[0]:.3f} "
                             f"(hold {best[1]:g} s, switch when waiting >= {best[2]} x running)")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
