"""mm's CUDA checkpoint wrapper (mmlib/system/cuda_checkpoint.py) on a real sleeping vLLM, beside the raw
sleep/wake it adds to: what the engine keeps on the card asleep, what it holds after the checkpoint (GPU
and host RAM), how long each step takes, and whether the greedy answer after restore + wake equals the one
before. The engine's pids are found as mm finds them (its process family, through proctree, that NVML
lists as holding the GPU).

GPU (after the kit's unpack; with `ballast.py --leave 12` for the 12 GiB card):
    python3 benchmarks/checkpoint_cycle.py --model .gpu-stage/models/dummy-7b-awq --out FILE [vLLM flags...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmlib.system import cuda_checkpoint, nvml, proctree  # noqa: E402

GIB = 1 << 30
PORT = 8123
URL = f"http://127.0.0.1:{PORT}"


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cycles", type=int, default=3)
    args, extra = ap.parse_known_args()
    out = open(args.out, "a")

    def say(line: str) -> None:
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    nv = nvml.session()
    report = nvml.probe(with_processes=False)
    drv = cuda_checkpoint.driver()
    say(f"# {nvml.gpu_name(nv)}, driver {report.driver}, driver API {drv.api_version()}, "
        f"vLLM {subprocess.run([sys.executable, '-c', 'import vllm; print(vllm.__version__)'], capture_output=True, text=True).stdout.strip()}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}; free at start {gib(nv.device(0, False).free)} GiB")
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--port", str(PORT),
            "--load-format", "dummy", "--enable-sleep-mode", "--served-model-name", "m", *extra]
    say("# " + " ".join(argv[3:]))
    log = open("/tmp/checkpoint_cycle.vllm.log", "w")
    srv = subprocess.Popen(argv, env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"}, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    http = httpx.Client(base_url=URL, timeout=300)
    t0 = time.time()
    while time.time() - t0 < 560:
        try:
            if http.get("/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if srv.poll() is not None:
            raise SystemExit(f"vLLM exited ({srv.returncode}); see /tmp/checkpoint_cycle.vllm.log")
        time.sleep(1)
    say(f"up in {time.time() - t0:.0f} s")

    def greedy() -> tuple[str, float]:
        a = time.perf_counter()
        r = http.post("/v1/completions", json={"model": "m", "prompt": "The quick brown fox", "max_tokens": 24,
                                               "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        return r.json()["choices"][0]["text"], time.perf_counter() - a

    def held() -> tuple[int | None, int | None, list[int]]:
        fam = proctree.family(srv.pid)
        pids = {p.pid for p in fam}
        gpu = nv.processes_bytes(pids)
        on_gpu = [p.pid for p in nv.device(0).processes if p.pid in pids]
        return (gpu if isinstance(gpu, int) else None), proctree.rss_bytes(fam), on_gpu

    before, _ = greedy()
    gpu, ram, engines = held()
    say(f"awake: gpu {gib(gpu)} GiB, host RAM {gib(ram)} GiB, engine pids on the GPU {engines}")
    rows = []
    for i in range(args.cycles):
        a = time.perf_counter()
        http.post("/sleep", params={"level": 1}).raise_for_status()
        b = time.perf_counter()
        time.sleep(0.5)
        g_sleep, r_sleep, engines = held()
        c = time.perf_counter()
        cuda_checkpoint.suspend(engines, drv)
        d = time.perf_counter()
        time.sleep(0.5)
        g_ck, r_ck, _ = held()
        card_used = nv.device(0, False).used
        e = time.perf_counter()
        cuda_checkpoint.resume(engines, drv)
        f = time.perf_counter()
        http.post("/wake_up").raise_for_status()
        g = time.perf_counter()
        text, first = greedy()
        rows.append((b - a, d - c, f - e, g - f, first, (f - e) + (g - f) + first))
        say(f"cycle {i + 1}: sleep {b - a:.3f} s -> asleep gpu {gib(g_sleep)} GiB ram {gib(r_sleep)} GiB; "
            f"checkpoint {d - c:.3f} s -> gpu {gib(g_ck)} GiB ram {gib(r_ck)} GiB (card used {gib(card_used)} GiB); "
            f"restore+unlock {f - e:.3f} s, wake_up {g - f:.3f} s, 24 greedy tokens {first:.3f} s; "
            f"greedy_same={text == before}")
    med = [statistics.median(c) for c in zip(*rows)]
    say(f"median: sleep {med[0]:.3f} s, checkpoint {med[1]:.3f} s, restore {med[2]:.3f} s, wake_up {med[3]:.3f} s, "
        f"answer {med[4]:.3f} s; checkpointed -> answered {med[5]:.3f} s")
    srv.terminate()
    try:
        srv.wait(30)
    except subprocess.TimeoutExpired:
        srv.kill()


if __name__ == "__main__":
    main()
