"""Every shipped profile on an emulated 12 GiB card, through mm: started, GPU memory predicted by
`mm check` beside what NVML measured, what it keeps asleep; then a round of requests through mm
that visits every profile twice (chat, perf, voice, ocr, baseline, default), so mm must switch,
evict and restart within 12 GiB.

Models are the weight-less folders of tests/fixtures/models-gpu served with `--load-format dummy`
(random weights of the real shapes: memory, start, sleep and wake are real, the text is noise);
the default profile's SmolLM2 gets the same treatment (its config and tokenizer, no weights). Each
shipped profile is copied into a fresh MM_HOME with only its model pointed at the fixture and
load_format = "dummy" added (and dtype = "bfloat16" for the AWQ ones on Hopper, where FlashAttention
3 refuses fp16 with an fp8 KV cache; a 12 GB consumer card has no FA3). Everything else is the
shipped profile as a user gets it; the daemon's config says gpu_budget = "12GiB".

Measured = the peak of the GPU's used memory over the baseline (the ballast alone) while only that
profile's servers run, sampled by NVML at 10 Hz from its start to the end of its requests; asleep =
the same after `mm sleep`, settled. Lines are appended to --out as they come, so a cut run keeps
what it finished.

GPU (after the kit's unpack and `ballast.py --leave 12`):
    python3 benchmarks/card12.py --out benchmark_results/runs/card12.txt [--part profiles|round]
(--part splits the run over two device sessions, appending to the same file; the round's restarts
reuse the compile caches the profiles part left in ~/.cache/card12-compile.) On a host with two
GPUs, each with a ballast leaving 12 GiB, `--round-gpu 1` (with CUDA_VISIBLE_DEVICES=0) runs the
round on the second card beside the profiles: a daemon of its own, each first visit of a profile
once the profiles part has moved past it, so that it restarts from the warm compile caches as a
round on its own would, and never beside the same profile's measured start.
Here (the fake vLLM: the flow only, no memory):
    PYTHONPATH=tests/faults/fakevllm:. python3 benchmarks/card12.py --fake
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import wave
import zlib
from pathlib import Path

import httpx
import tomli_w
from common import ROOT

from mmlib.profiles.profile import load_profile

FIXTURES = ROOT / "tests" / "fixtures" / "models-gpu"
# The shipped profiles' models and their weight-less folders.
MODEL_FIXTURES = {
    "Qwen/Qwen2.5-7B-Instruct-AWQ": "qwen2.5-7b-awq",
    "nvidia/Llama-3.1-Nemotron-Nano-4B-v1.1": "nemotron-nano-4b",
    "openai/whisper-large-v3-turbo": "whisper-large-v3-turbo",
    "lightonai/LightOnOCR-1B-1025": "lightonocr-1b",
}
ORDER = ["chat", "perf", "voice", "ocr", "baseline", "default"]
# Beside vLLM's and FlashInfer's own caches, so that issue_runs.sh carries them to the next machine
# for a round run on its own (--part round)
COMPILE_CACHES = Path.home() / ".cache" / "card12-compile"
GIB = 1 << 30
CARD = 12 * GIB


# --- the profiles, as shipped but for the model ---------------------------------------------------
def write_profiles(home: Path, fake: bool, hopper: bool, own_caches: bool = True) -> None:
    """A user profile of the same name shadows the shipped one: the shipped file with its model
    pointed at the fixture (profiles that inherit their model, perf from baseline, are left alone)."""
    folder = home / "config" / "profiles"
    folder.mkdir(parents=True)
    for path in sorted((ROOT / "profiles").glob("*.toml")):
        doc = tomllib.loads(path.read_text())
        if "model" not in doc:
            continue
        if fake:
            share = doc.get("engine", {}).get("gpu_memory_utilization")
            doc = {k: doc[k] for k in ("description", "served_model_name", "aliases", "share_gpu") if k in doc}
            if share:
                doc["engine"] = {"gpu_memory_utilization": share}  # a stack's members must fit together
            doc.update(model=f"fake/{path.stem}", sleep={"enabled": True},
                       env={"FAKE_TOKENS": "8", "FAKE_TOKEN_DELAY": "0.01"})
        else:
            model = doc["model"]
            if model in MODEL_FIXTURES:
                doc["model"] = str(FIXTURES / MODEL_FIXTURES[model])
            elif not model.startswith("embedded:"):
                raise SystemExit(f"{path.name}: no fixture for {model}; add one to {FIXTURES}")
            engine = doc.setdefault("engine", {})
            engine["load_format"] = "dummy"
            # each profile compiles into caches of its own, emptied before its measured start (a
            # first start, as on a user's machine: the one fit.py predicts); the round reuses them
            compiled = COMPILE_CACHES / path.stem
            if own_caches:
                doc.setdefault("env", {}).update(VLLM_CACHE_ROOT=str(compiled / "vllm"),
                                                 TORCHINDUCTOR_CACHE_DIR=str(compiled / "inductor"))
            if hopper and "awq" in model.lower():
                engine.setdefault("dtype", "bfloat16")
        (folder / path.name).write_text(tomli_w.dumps(doc))


def embedded_without_weights(cache: Path) -> None:
    """The default profile's model folder as mm would have converted it, minus the weights."""
    target = cache / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True, exist_ok=True)
    src = FIXTURES / "smollm2-135m"
    for f in src.iterdir():
        if f.name != "README.md":
            shutil.copy(f, target / f.name)
    shutil.copy(FIXTURES / "qwen2.5-7b-awq" / "tokenizer.json", target / "tokenizer.json")  # the same vocabulary


# --- measuring --------------------------------------------------------------------------------------
class GpuSampler:
    """Peak of the GPU's used bytes over a baseline, sampled in a thread (mm's NVML wrapper; none
    when fake)."""

    def __init__(self) -> None:
        from mmlib.system import nvml

        self._nv, self._name = nvml.session(), nvml.gpu_name
        self.peak = 0
        self._stop: threading.Event | None = None

    @property
    def available(self) -> bool:
        return self._nv.available

    def used(self) -> int:
        found = self._nv.device_bytes()
        return found[0] if found else 0

    def free(self) -> int:
        found = self._nv.device_bytes()
        return found[1] - found[0] if found else 0

    def name(self) -> str:
        return self._name(self._nv) if self.available else "no GPU (fake vLLM)"

    def settled(self, timeout: float = 60.0) -> int:
        """Used bytes once two readings a second apart agree within 64 MiB."""
        last, deadline = self.used(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = self.used()
            if abs(now - last) < 64 << 20:
                return now
            last = now
        return last

    def __enter__(self) -> GpuSampler:
        self.peak, self._stop = self.used(), threading.Event()

        def loop() -> None:
            while not self._stop.wait(0.1):
                self.peak = max(self.peak, self.used())
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


# --- requests ----------------------------------------------------------------------------------------
def png_data_url(size: int = 64) -> str:
    """A small white page with a black bar: enough for the OCR model's image path."""
    rows = b"".join(b"\x00" + bytes([0 if size // 3 < y < size // 2 else 255] * size * 3) for y in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A 16 kHz mono tone: what vLLM's transcription endpoint reads without resampling."""
    import math

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate)))
                               for i in range(int(seconds * rate))))
    return buf.getvalue()


def requests_for(profile: str, served: dict[str, str], fake: bool) -> list[tuple[str, str, dict]]:
    """(what, path, body) of the requests that visit a profile: a chat answer from each LLM, a
    transcription for speech-to-text, a page image for OCR."""
    def chat(model: str, content) -> tuple[str, str, dict]:
        return (model, "/v1/chat/completions",
                {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": content}]})
    if profile == "voice":
        out = [chat(served["voice-llm"], "Say hello.")]
        out.append(chat(served["voice-stt"], "x") if fake else
                   (served["voice-stt"], "/v1/audio/transcriptions", {"model": served["voice-stt"]}))
        return out
    if profile == "ocr" and not fake:
        return [chat(served["ocr"], [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                     {"type": "text", "text": "Read this page."}])]
    return [chat(served[profile], f"Tell me about the number {random.randint(0, 1000)}.")]


def send(client: httpx.Client, base: str, req: tuple[str, str, dict]) -> str | None:
    """None when answered by the model asked for; else what went wrong, in a line."""
    model, path, body = req
    try:
        if path.endswith("transcriptions"):
            r = client.post(base + path, data=body, files={"file": ("tone.wav", wav_bytes(), "audio/wav")})
        else:
            r = client.post(base + path, json=body)
    except httpx.HTTPError as e:
        return f"{model}: {type(e).__name__}: {e}"
    if r.status_code != 200:
        return f"{model}: HTTP {r.status_code}: {r.text[:200]}"
    doc = r.json()
    if "model" in doc and doc["model"] != model:
        return f"{model}: answered by {doc['model']}"
    return None


# --- the run -------------------------------------------------------------------------------------------
class Run:
    _lock = threading.Lock()  # the profiles and a round on a second GPU write the same file

    def __init__(self, env: dict, out: Path | None) -> None:
        self.env, self.out = env, out
        self.base = f"http://127.0.0.1:{env['MM_PROXY_PORT']}"

    def line(self, text: str) -> None:
        with self._lock:
            print(text, flush=True)
            if self.out:
                with open(self.out, "a") as f:
                    f.write(text + "\n")

    def mm(self, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mmlib", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def start_daemon(self) -> None:
        """The daemon in the background, as `mm up` would start it (a round on its own has no `mm up`)."""
        logs = Path(self.env["MM_HOME"]) / "state" / "logs"  # where `mm up` has it write, for the log tarball
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "daemon.log", "ab") as log:
            subprocess.Popen([sys.executable, "-m", "mmlib", "daemon"], env=self.env, cwd=ROOT, start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(self.base + "/v1/models", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.5)

    def status(self) -> dict:
        return json.loads(self.mm("status", "--json").stdout)


def served_names() -> dict[str, str]:
    names = {}
    for name in ("chat", "perf", "baseline", "ocr", "default", "voice-llm", "voice-stt"):
        names[name] = load_profile(name).served_model_name
    return names


def predicted(name: str) -> str:
    from mmlib.guard.checks import predicted_gib

    try:
        return f"{predicted_gib(name, CARD):.2f}"
    except Exception as e:  # a fixture the estimate cannot read: say so on the line
        return f"n/a({type(e).__name__})"


def new_home(fake: bool, hopper: bool, gpu: str | None = None, own_caches: bool = True) -> dict:
    """A fresh MM_HOME with the shipped profiles pointed at the fixtures, gpu_budget 12GiB; the
    environment of the mm commands and the daemon that use it (on `gpu` where given)."""
    home = Path(tempfile.mkdtemp(prefix="mm-card12-"))
    cache = home / "cache"
    write_profiles(home, fake, hopper, own_caches)
    embedded_without_weights(cache)
    (home / "config" / "config.toml").write_text('gpu_budget = "12GiB"\n')
    env = {**os.environ, "MM_HOME": str(home), "MM_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1",
           "MM_PROXY_PORT": str(8200 + random.randint(0, 500)),
           "MM_RUNTIME_DIR": tempfile.mkdtemp(prefix="mm-", dir="/tmp")}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def the_round(run: Run, profiles: list[str], served: dict[str, str], rounds: int, fake: bool,
              moved_past: dict[str, threading.Event] | None = None) -> None:
    """Every profile, in the issue's order, `rounds` times, through mm as a client would; the
    first visit of each waits for moved_past[profile] where given (a round beside the profiles)."""
    n = failed = 0
    errors: list[str] = []
    t0 = time.monotonic()
    with httpx.Client(timeout=1200) as client:
        for visit in range(rounds):
            for name in profiles:
                if moved_past and visit == 0:
                    moved_past[name].wait()
                for req in requests_for(name, served, fake):
                    n += 1
                    err = send(client, run.base, req)
                    if err:
                        failed += 1
                        errors.append(err)
    status = run.status()
    run.line(f"round: requests={n} failed={failed} seconds={time.monotonic() - t0:.0f} "
             f"switches_last_min={status.get('switches_per_min')}")
    for err in errors[:5]:
        run.line(f"#   {err[:300]}")
    run.line("# after the round: " + ", ".join(f"{s['profile']}={s['state']}" for s in status["servers"])
             + f"; card {status.get('card', {}).get('free')} bytes free")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--fake", action="store_true", help="the fake vLLM: the flow only, no memory")
    ap.add_argument("--profiles", default=",".join(ORDER), help="comma-separated, in this order")
    ap.add_argument("--rounds", type=int, default=2, help="visits of every profile in the round")
    ap.add_argument("--part", choices=("all", "profiles", "round"), default="all",
                    help="the per-profile starts, the round, or both (one device session may not hold both)")
    ap.add_argument("--round-gpu", metavar="INDEX",
                    help="run the round on this GPU (its own ballast leaving 12 GiB) beside the profiles")
    args = ap.parse_args()
    if args.round_gpu is not None and args.part != "all":
        raise SystemExit("card12.py: --round-gpu runs the profiles and the round together: leave --part out")
    gpu = GpuSampler()
    hopper = gpu.available and any(h in gpu.name() for h in ("H100", "H200", "H800", "GH200"))
    env = new_home(args.fake, hopper)
    os.environ.update(MM_HOME=env["MM_HOME"], MM_CACHE_DIR=env["MM_CACHE_DIR"])  # for load_profile here
    run = Run(env, args.out)
    served = served_names()
    profiles = [p for p in args.profiles.split(",") if p]
    base_used = gpu.settled()
    beside = ""
    if args.round_gpu is not None:
        from mmlib.system import nvml

        other = nvml.Nvml(visible=args.round_gpu)
        found = other.device_bytes() if other.available else None
        beside = (f"; the round on GPU {args.round_gpu} of the same host beside the profiles (free "
                  f"{gib(found[1] - found[0]) if found else 'n/a'} GiB, its own ballast and daemon; each first "
                  f"visit once the profiles part has moved past that profile, its compile caches warm)")
    run.line(f"# benchmarks/card12.py, {time.strftime('%Y-%m-%d %H:%M')}: {gpu.name()}; free {gib(gpu.free())} GiB "
             f"with nothing started (the ballast holds the rest); gpu_budget 12GiB; models: random weights of "
             f"the real shapes (tests/fixtures/models-gpu){'; dtype bfloat16 for AWQ on Hopper' if hopper else ''}"
             + ("" if args.part == "all" else f"; part: {args.part}") + beside)
    beside_run: Run | None = None
    moved_past = {name: threading.Event() for name in profiles}
    round_thread: threading.Thread | None = None
    if args.round_gpu is not None:
        beside_run = Run(new_home(args.fake, hopper, args.round_gpu), args.out)
        beside_run.start_daemon()

        def round_beside() -> None:
            try:
                the_round(beside_run, profiles, served, args.rounds, args.fake, moved_past)
            except Exception as e:  # say so in the file rather than die quietly in a thread
                beside_run.line(f"# the round beside the profiles failed: {type(e).__name__}: {e}")
        round_thread = threading.Thread(target=round_beside)
        round_thread.start()
    previous: str | None = None
    try:
        for name in profiles if args.part != "round" else []:
            stopped = run.mm("stop", "--all")
            if stopped.returncode and "nothing is running" not in stopped.stdout:
                run.line(f"# stop --all: {stopped.stdout.strip()} {stopped.stderr.strip()}")
            if previous:
                moved_past[previous].set()
            previous = name
            for member in load_profile(name).stack or (name,):
                shutil.rmtree(COMPILE_CACHES / member, ignore_errors=True)
            before = gpu.settled()
            t0 = time.monotonic()
            failures: list[str] = []
            with gpu as sampled:
                up = run.mm("up", name, *(["--force"] if args.fake else []))  # the fake has few flags
                start_s = time.monotonic() - t0
                started = "ok" if up.returncode == 0 else "failed"
                if up.returncode == 0:
                    with httpx.Client(timeout=600) as client:
                        for req in requests_for(name, served, args.fake):
                            err = send(client, run.base, req)
                            if err:
                                failures.append(err)
            measured = sampled.peak - before
            asleep = "n/a"
            if up.returncode == 0:
                slept = run.mm("sleep", name if name != "voice" else "voice-llm")
                if name == "voice":
                    slept = run.mm("sleep", "voice-stt")
                asleep = gib(gpu.settled() - base_used) if slept.returncode == 0 and gpu.available else "n/a"
            line = (f"profile={name} started={started} predicted_gib={'n/a' if args.fake else predicted(name)} "
                    f"measured_gib={gib(measured) if gpu.available else 'n/a'} asleep_gib={asleep} "
                    f"start_s={start_s:.0f} requests_failed={len(failures)}")
            run.line(line)
            if up.returncode:
                run.line(f"#   {name}: {(up.stderr or up.stdout).strip().splitlines()[-1:]}")
            for err in failures[:3]:
                run.line(f"#   {err[:300]}")
        if args.part == "profiles":
            return
        run.mm("stop", "--all")
        if round_thread is not None:
            run.mm("daemon", "stop")  # this card is free for what comes next (issue_runs.sh waits for this line)
            print("# card12: profiles done", flush=True)
            for event in moved_past.values():
                event.set()
            round_thread.join()
            return
        # The round: every profile, in the order, twice, through mm as a client would.
        if args.part == "round":
            run.start_daemon()
        the_round(run, profiles, served, args.rounds, args.fake)
    finally:
        for event in moved_past.values():  # a failed profiles part must not leave the round waiting
            event.set()
        if round_thread is not None:
            round_thread.join()
            beside_run.mm("daemon", "stop")
        run.mm("daemon", "stop")


if __name__ == "__main__":
    main()
