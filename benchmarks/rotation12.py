"""Issue 20's run of record: every shipped profile kept as a sleeper on an emulated 12 GiB card, then
a rotation through them, each switch a restore (the CUDA driver's process checkpoint), a wake or a
restart, as mm did it.

1. Every shipped profile (chat, perf, voice, ocr, baseline, default) is started once through mm and
   asked its question (greedy: temperature 0, a fixed prompt; the first answer is the reference),
   then put to sleep and checkpointed off the card (`mm sleep NAME --checkpoint`, each member of a
   stack), so that all six are sleepers together. A line per profile:
       profile=NAME asleep_gpu_gib=X asleep_ram_gib=Y
   (mm status's figures: NVML for the GPU, the process tree's PSS for RAM, each shared page divided
   among the processes that map it; a stack sums its members).
2. A round visiting them in a shuffled order (seeded; no profile twice in a row) --rounds times,
   through mm's proxy as a client would. A line per switch:
       switch from=A to=B kind=restore|wake|restart first_token_s=S greedy_same=True|False
   kind is what mm did to the target's servers, read from `mm status` before and after: a new pid is
   a restart, else checkpointed before is a restore, asleep a wake (the slowest member of a stack
   counts). first_token_s is from sending the request to its first streamed event (a transcription:
   its whole answer), the slowest of the profile's requests; greedy_same compares the texts with the
   profile's first answer.
3. The last line: round: switches=N restarts=R failed=F p50_s=P max_s=M

Models are the weight-less fixtures served with random weights of the real shapes (card12.py's
profiles, as shipped but for the model). Until the scheduler checkpoints a sleeper on its own when a
switch needs room, --explicit-checkpoint checkpoints the previous profile by command before each
switch (not counted in first_token_s); the header says which.

GPU (after the kit's unpack and `ballast.py --leave 12`; benchmarks/device/rotation12.sh runs it in
the background, in pieces under 10 minutes):
    python3 benchmarks/rotation12.py            # -> benchmark_results/rotation12_<h100|h200>.txt
Here (the fake vLLM on the fake card and driver of tests/faults/fakegpu: the flow only):
    PYTHONPATH=tests/faults/fakevllm:tests/faults/fakegpu:. python3 benchmarks/rotation12.py --dry
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from card12 import ORDER, GpuSampler, Run, new_home, png_data_url, served_names, wav_bytes
from common import ROOT

from mmlib.profiles.profile import load_profile

PROMPT = "Tell me about the number 12."
TOKENS = 16
# What mm did to a server, slowest first: a stack's switch is as slow as its slowest member.
KINDS = ("restart", "restore", "wake", "awake")


# --- what is pure (tests/unit/test_rotation12.py) ----------------------------------------------------
def device_tag(gpu_name: str) -> str:
    """h100 or h200 from NVML's name; else the name, lower case, in one word."""
    for tag in ("h200", "h100"):
        if tag in gpu_name.lower():
            return tag
    return "".join(c for c in gpu_name.lower() if c.isalnum()) or "none"


def rotation(profiles: list[str], rounds: int, seed: int, after: str | None = None) -> list[str]:
    """`rounds` shuffled visits of every profile, never the same one twice in a row (a switch each)."""
    rng, out = random.Random(seed), []
    for _ in range(rounds):
        order = list(profiles)
        rng.shuffle(order)
        last = out[-1] if out else after
        if len(order) > 1 and order[0] == last:
            order[0], order[-1] = order[-1], order[0]
        out += order
    return out


def member_kind(before: dict | None, after: dict | None) -> str:
    """What mm did to one server between two `mm status` readings of it."""
    if before is None or after is None or before.get("pid") is None or before["pid"] != after.get("pid"):
        return "restart"
    return {"checkpointed": "restore", "asleep": "wake", "falling asleep": "wake",
            "awake": "awake"}.get(before.get("state"), "restart")


def switch_kind(members: list[str], before: dict[str, dict], after: dict[str, dict]) -> str:
    kinds = [member_kind(before.get(m), after.get(m)) for m in members]
    return min(kinds, key=KINDS.index)


def profile_line(name: str, members: list[str], servers: dict[str, dict]) -> str:
    def total(key: str) -> str:
        values = [((servers.get(m) or {}).get("memory") or {}).get(key) for m in members]
        if key == "ram_mib" and None in values:  # (a status without PSS figures)
            values = [((servers.get(m) or {}).get("memory") or {}).get("rss_mib") for m in members]
        return "n/a" if any(v is None for v in values) else f"{sum(values) / 1024:.2f}"
    return f"profile={name} asleep_gpu_gib={total('gpu_mib')} asleep_ram_gib={total('ram_mib')}"


@dataclass
class Switch:
    source: str
    target: str
    kind: str
    first_token_s: float | None  # None: a request failed
    same: bool

    def line(self) -> str:
        s = "n/a" if self.first_token_s is None else f"{self.first_token_s:.3f}"
        return f"switch from={self.source} to={self.target} kind={self.kind} first_token_s={s} greedy_same={self.same}"


def parse_switch(line: str) -> Switch:
    f = dict(part.split("=", 1) for part in line.split()[1:])
    return Switch(f["from"], f["to"], f["kind"], None if f["first_token_s"] == "n/a" else float(f["first_token_s"]),
                  f["greedy_same"] == "True")


def summary_line(switches: list[Switch]) -> str:
    times = [s.first_token_s for s in switches if s.first_token_s is not None]
    p50 = f"{statistics.median(times):.3f}" if times else "n/a"
    top = f"{max(times):.3f}" if times else "n/a"
    return (f"round: switches={len(switches)} restarts={sum(s.kind == 'restart' for s in switches)} "
            f"failed={sum(s.first_token_s is None for s in switches)} p50_s={p50} max_s={top}")


# --- requests -----------------------------------------------------------------------------------------
def visit(profile: str, served: dict[str, str], fake: bool) -> list[tuple[str, str, dict]]:
    """(model, path, body) of a visit: the same greedy question each time (card12's, without its
    random number), a page for OCR, a tone for speech-to-text."""
    def chat(model: str, content) -> tuple[str, str, dict]:
        return (model, "/v1/chat/completions", {"model": model, "max_tokens": TOKENS, "temperature": 0,
                                                "stream": True, "messages": [{"role": "user", "content": content}]})
    if profile == "voice":
        stt = served["voice-stt"]
        return [chat(served["voice-llm"], "Say hello."),
                chat(stt, "x") if fake else (stt, "/v1/audio/transcriptions", {"model": stt, "temperature": "0"})]
    if profile == "ocr":
        return [chat(served["ocr"], [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                     {"type": "text", "text": "Read this page."}])]
    return [chat(served[profile], PROMPT)]


def ask(client: httpx.Client, base: str, req: tuple[str, str, dict]) -> tuple[float, str]:
    """(seconds to the first streamed event, or to a transcription's answer; the text). Raises
    RuntimeError with a line on any failure."""
    model, path, body = req
    t0 = time.perf_counter()
    try:
        if path.endswith("transcriptions"):
            r = client.post(base + path, data=body, files={"file": ("tone.wav", wav_bytes(), "audio/wav")})
            if r.status_code != 200:
                raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.text[:200]}")
            return time.perf_counter() - t0, r.json().get("text", "")
        first, words = None, []
        with client.stream("POST", base + path, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                first = first or time.perf_counter() - t0
                doc = json.loads(line[6:])
                if "error" in doc:
                    raise RuntimeError(f"{model}: {doc['error']}")
                words += [c["delta"].get("content") or "" for c in doc.get("choices", [])]
        if first is None:
            raise RuntimeError(f"{model}: no answer")
        return first, "".join(words)
    except httpx.HTTPError as e:
        raise RuntimeError(f"{model}: {type(e).__name__}: {e}") from None


# --- the run --------------------------------------------------------------------------------------------
def members(profile: str) -> list[str]:
    return list(load_profile(profile).stack) or [profile]


def servers(run: Run) -> dict[str, dict]:
    return {s["profile"]: s for s in run.status().get("servers", [])}


def checkpoint(run: Run, profile: str) -> str | None:
    """Sleep each member and checkpoint it off the card; None, or what went wrong."""
    for m in members(profile):
        done = run.mm("sleep", m, "--checkpoint")
        if done.returncode:
            return f"{m}: {(done.stderr or done.stdout).strip()[:300]}"
    return None


def start_all(run: Run, profiles: list[str], served: dict, fake: bool, client: httpx.Client) -> dict[str, list[str]]:
    """Each profile started once and asked its question, then checkpointed; the first answers."""
    first: dict[str, list[str]] = {}
    for name in profiles:
        t0 = time.monotonic()
        up = run.mm("up", name, *(["--force"] if fake else []))
        if up.returncode:
            run.line(f"# {name}: did not start: {(up.stderr or up.stdout).strip().splitlines()[-1:]}")
            continue
        try:
            first[name] = [ask(client, run.base, req)[1] for req in visit(name, served, fake)]
        except RuntimeError as e:
            run.line(f"# {name}: its first answer failed: {e}")
        problem = checkpoint(run, name)
        run.line(f"# {name}: started and answered in {time.monotonic() - t0:.0f} s; "
                 + (f"checkpoint failed: {problem}" if problem else "asleep and checkpointed"))
    found = servers(run)
    for name in profiles:
        run.line(profile_line(name, members(name), found))
    run.line("# sleepers: " + ", ".join(f"{n}={s['state']}" for n, s in sorted(found.items()))
             + f"; card {run.status().get('card', {}).get('free', 0) / 2**30:.2f} GiB free")
    run.line(ram_line(run, "with every profile asleep"))
    return first


def ram_line(run: Run, when: str) -> str:
    """The machine's RAM, mm's RAM budget (for its servers together) and what the sleepers hold (PSS, and RSS for
    comparison with earlier runs), so that a stop for RAM can be read against its figures."""
    import psutil

    status, vm = run.status(), psutil.virtual_memory()
    asleep = [s for s in status.get("servers", []) if s.get("state") in ("asleep", "checkpointed")]

    def gib(key: str) -> str:
        return f"{sum((s.get('memory') or {}).get(key) or 0 for s in asleep) / 1024:.1f}"
    budget = status.get("ram_budget")
    return (f"# ram {when}: total {vm.total / 2**30:.1f} GiB, available {vm.available / 2**30:.1f}; mm's RAM budget "
            f"(its servers together) {'none' if budget is None else f'{budget / 2**30:.1f}'}; {len(asleep)} sleepers hold "
            f"{gib('ram_mib')} GiB (PSS; RSS {gib('rss_mib')})")


def stops_for_ram(home: str) -> list[str]:
    """The daemon's lines for sleepers it stopped or checkpointed on its own, and failed checkpoints."""
    log = Path(home) / "state" / "logs" / "daemon.log"
    words = ("to free", "checkpoint failed", "restore failed", "starts again")
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [f"# daemon: {line[:300]}" for line in lines if any(w in line for w in words)]


def the_round(run: Run, order: list[str], last: str, first: dict[str, list[str]], served: dict, fake: bool,
              client: httpx.Client, explicit: bool, max_restarts: int = 1_000) -> list[Switch]:
    switches = []
    for target in order:
        if explicit:
            problem = checkpoint(run, last)
            if problem:
                run.line(f"# checkpoint of {last} before the switch failed: {problem}")
        before = servers(run)
        slowest, texts = 0.0, []
        try:
            for req in visit(target, served, fake):
                seconds, text = ask(client, run.base, req)
                slowest, texts = max(slowest, seconds), texts + [text]
            took: float | None = slowest
        except RuntimeError as e:
            run.line(f"#   {str(e)[:300]}")
            took = None
        kind = switch_kind(members(target), before, servers(run))
        switch = Switch(last, target, kind, took, took is not None and texts == first.get(target))
        run.line(switch.line())
        switches.append(switch)
        last = target
        if sum(s.kind == "restart" for s in switches) > max_restarts:
            run.line(f"# the round stopped after {max_restarts + 1} restarts (cold starts of a minute or more "
                     f"each would outlast the device's time)")
            break
    run.line(summary_line(switches))
    return switches


def vllm_version(fake: bool) -> str:
    from mmlib.profiles.vllm_cmd import installed_vllm

    found = installed_vllm()
    if found or fake:
        return found.version if found else "?"
    r = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def dry_environment() -> None:
    """The fake card and driver of tests/faults/fakegpu for this process and the daemon it starts."""
    state = Path(tempfile.mkdtemp(prefix="mm-rotation12-gpu-"))
    os.environ.update(FAKE_GPU_DIR=str(state), MM_FAKE_CUDA_CHECKPOINT=str(state / "driver.json"),
                      FAKE_GPU_AWAKE_MIB="8192", FAKE_GPU_ASLEEP_MIB="1024")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="default: benchmark_results/rotation12_<device>.txt")
    ap.add_argument("--dry", action="store_true", help="the fake vLLM, card and driver: the flow only")
    ap.add_argument("--dry-budget", default="", help='with --dry: a gpu_budget ("12GiB"), so that switches need room')
    ap.add_argument("--profiles", default=",".join(ORDER))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-restarts", type=int, default=4, help="end the round after more restarts than this")
    ap.add_argument("--ram-budget", default="", help='config.toml ram_budget for the run ("100GiB"; default: mm\'s own)')
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--explicit-checkpoint", action="store_true",
                    help="checkpoint the previous profile by command before each switch")
    args = ap.parse_args()
    if args.dry:
        dry_environment()
    gpu = GpuSampler()
    from mmlib.system import nvml

    report = nvml.probe(with_processes=False)
    tag = device_tag(gpu.name())
    out = args.out or (Path(tempfile.gettempdir()) / "rotation12_dry.txt" if args.dry
                       else ROOT / "benchmark_results" / f"rotation12_{tag}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    hopper = gpu.available and tag in ("h100", "h200")
    env = new_home(args.dry, hopper, own_caches=False)  # vLLM's shared caches: profiles of one model share kernels
    if args.dry:  # no budget unless asked: the fake card's predictions are shares of 80 GiB
        (Path(env["MM_HOME"]) / "config" / "config.toml").write_text(
            f'gpu_budget = "{args.dry_budget}"\n' if args.dry_budget else "")
    if args.ram_budget:
        with open(Path(env["MM_HOME"]) / "config" / "config.toml", "a") as f:
            f.write(f'ram_budget = "{args.ram_budget}"\n')
    os.environ.update(MM_HOME=env["MM_HOME"], MM_CACHE_DIR=env["MM_CACHE_DIR"])  # for load_profile here
    run = Run(env, out)
    profiles = [p for p in args.profiles.split(",") if p]
    run.line(f"# benchmarks/rotation12.py, {time.strftime('%Y-%m-%d %H:%M')}: device={tag} ({gpu.name()}) "
             f"driver={report.driver or '?'} vllm={vllm_version(args.dry)}")
    run.line(f"# card: {gpu.free() / 2**30:.2f} GiB free with nothing started (the ballast holds the rest); "
             f"{('gpu_budget ' + (args.dry_budget or 'none')) + ' (dry)' if args.dry else 'gpu_budget 12GiB'}; models: random weights of the real shapes; "
             f"{args.rounds} rounds, seed {args.seed}; ram_budget {args.ram_budget or 'mm default'}; checkpoints before a switch: "
             + ("by command (--explicit-checkpoint)" if args.explicit_checkpoint else "mm's own"))
    try:
        with httpx.Client(timeout=1200) as client:
            first = start_all(run, profiles, served_names(), args.dry, client)
            order = rotation(profiles, args.rounds, args.seed, after=profiles[-1])
            the_round(run, order, profiles[-1], first, served_names(), args.dry, client, args.explicit_checkpoint,
                      args.max_restarts)
            run.line(ram_line(run, "after the round"))
            for line in stops_for_ram(env["MM_HOME"]):
                run.line(line)
    finally:
        run.mm("daemon", "stop")


if __name__ == "__main__":
    main()
