"""Sleep level 2 through mm on a GPU: the model must answer the same after mm wakes it.

Level 2 drops the weights. vLLM's plain /wake_up then gives the weights' memory back with whatever it
holds, and the model answers garbage; mm wakes a level-2 sleeper with wake_up?tags=weights, the
collective_rpc reload_weights, then wake_up?tags=kv_cache. reload_weights reads the checkpoint from
disk (it refuses --load-format dummy), so this script first saves a random-weight checkpoint (the
SmolLM2-135M shapes, with the kit's tokenizer).

Steps: greedy answer A through mm; the bug shown by hand (sleep level 2 + plain wake_up straight to
the server: answer B); `mm sleep` (level 2, mm's own path) and a request that makes mm wake it:
answer C. The result file says `greedy before == after: True` when C == A.

Usage (GPU): python3 benchmarks/level2_wake.py --tokenizer .gpu-stage/models/dummy-1.5b --out FILE
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT, finish, mm
PROMPT = "List the first ten prime numbers, then explain why 1 is not prime."
PROFILE = """
model = "{path}"
served_model_name = "deep"
startup_timeout = 900
[sleep]
enabled = true
level = 2
[engine]
dtype = "bfloat16"
enforce_eager = true
gpu_memory_utilization = 0.1
kv_cache_memory_bytes = 1000000000
max_model_len = 2048
"""



def random_checkpoint(folder: Path, tokenizer: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                      tie_word_embeddings=True, rope_theta=100000.0, torch_dtype="bfloat16",
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    for f in tokenizer.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, folder / f.name)


def greedy(client: httpx.Client, url: str) -> str:
    r = client.post(f"{url}/v1/completions", json={"model": "deep", "prompt": PROMPT, "max_tokens": 32,
                                                     "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]  # (the fake vLLM answers chat)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".gpu-stage" / "models" / "dummy-1.5b")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mm-level2-"))
    ckpt = home / "checkpoint"
    random_checkpoint(ckpt, args.tokenizer)
    (home / "config" / "profiles").mkdir(parents=True)
    (home / "config" / "profiles" / "deep.toml").write_text(PROFILE.format(path=ckpt))
    port = 8700
    env = {**os.environ, "MM_HOME": str(home), "MM_PROXY_PORT": str(port),
           "MM_RUNTIME_DIR": tempfile.mkdtemp(prefix="mm-", dir="/tmp")}
    proxy, out = f"http://127.0.0.1:{port}", []
    try:
        t0 = time.perf_counter()
        mm(env, "up", "deep", "--force")
        out.append(f"# started in {time.perf_counter() - t0:.0f} s")
        server = json.loads(mm(env, "status", "--json"))["servers"][0]
        client = httpx.Client(timeout=300)
        raw = httpx.Client(timeout=300, base_url="http://mm-upstream",
                           transport=httpx.HTTPTransport(uds=server["uds"])) if server.get("uds") else \
            httpx.Client(timeout=300, base_url=server["url"])
        before = greedy(client, proxy)
        # The bug, by hand: level 2 then a plain wake_up.
        raw.post("/sleep", params={"level": 2}).raise_for_status()
        raw.post("/wake_up").raise_for_status()
        plain = greedy(raw, "http://mm-upstream" if server.get("uds") else server["url"])
        # mm's own path: sleep at the profile's level 2, then a request makes mm wake it.
        t1 = time.perf_counter()
        mm(env, "sleep", "deep")
        slept_s = time.perf_counter() - t1
        asleep = json.loads(mm(env, "status", "--json"))["servers"][0]
        t2 = time.perf_counter()
        after = greedy(client, proxy)
        woke_s = time.perf_counter() - t2
        calls = asleep.get("memory", {})
        out += [f"before: {before!r}", f"plain wake_up after level 2 (by hand): {plain!r}",
                f"after mm's level-2 wake: {after!r}",
                f"plain wake_up == before: {plain == before}",
                f"greedy before == after: {after == before}",
                f"mm sleep (level 2) {slept_s:.2f} s; request while asleep answered in {woke_s:.2f} s "
                f"(wake_up weights + reload_weights + wake_up kv_cache + 32 tokens)",
                f"asleep: state {asleep['state']}, GPU {calls.get('gpu_mib')} MiB, RAM {calls.get('rss_mib')} MiB"]
    finally:
        finish(out, args.out, env)


if __name__ == "__main__":
    main()
