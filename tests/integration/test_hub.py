"""Pulling models and fitting them before the download, against a local hub (tests/localhub.py, the
hub's URL layout with HEAD, ETag and Range) through the real CLI and the real huggingface_hub."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_mm
from tests.localhub import LocalHub, write_safetensors

TINY = "mm-test/tiny-llama"
SHARDED = "mm-test/sharded"
BIG = "mm-test/big-7b"
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512,
               "vocab_size": 2048, "torch_dtype": "bfloat16", "max_position_embeddings": 2048}
# Qwen2.5-7B's shapes; its safetensors header says 7.6 billion BF16 parameters but the file holds the
# header only: a fit check that downloaded the weights would fail to.
BIG_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
              "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
              "intermediate_size": 18944, "vocab_size": 152064, "torch_dtype": "bfloat16",
              "max_position_embeddings": 32768, "tie_word_embeddings": False}
BIG_PARAMS = 7_615_616_512


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("repos")
    tiny = base / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tiny / "tokenizer.json").write_text("{}")
    (tiny / "README.md").write_text("a tiny model for tests\n")
    write_safetensors(tiny / "model.safetensors", {"embed": ("BF16", [2048, 256]), "layers": ("BF16", [2, 589824])})
    # weights vLLM does not load: a pull leaves them on the hub
    write_safetensors(tiny / "original" / "consolidated.safetensors", {"w": ("BF16", [1024, 256])})
    (tiny / "pytorch_model.bin").write_bytes(b"\0" * 70_000)

    sharded = base / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(TINY_CONFIG))
    write_safetensors(sharded / "model-00001-of-00002.safetensors", {"a": ("BF16", [256, 1024])})  # 0.5 MiB
    write_safetensors(sharded / "model-00002-of-00002.safetensors", {"b": ("BF16", [8192, 1024])})  # 16 MiB
    write_safetensors(sharded / "model-extra.safetensors", {"c": ("BF16", [256, 256])})  # not in the index
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                        "b": "model-00002-of-00002.safetensors"}}))

    big = base / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(BIG_CONFIG))
    write_safetensors(big / "model.safetensors", {"embed": ("BF16", [152064, 3584]), "lm_head": ("BF16", [152064, 3584]),
                                                  "layers": ("BF16", [BIG_PARAMS - 2 * 152064 * 3584])}, data=False)
    return {TINY: tiny, SHARDED: sharded, BIG: big}


@pytest.fixture
def env(mm_env, tmp_path) -> dict:
    e = {**mm_env, "HF_HUB_CACHE": str(tmp_path / "hf-hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HOME"):
        os.environ.pop(var, None)
    return e


def blobs(env: dict, repo: str) -> dict[str, Path]:
    """The files of the repo's cached snapshot."""
    snaps = list((Path(env["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}" / "snapshots").glob("*"))
    return {p.relative_to(snaps[0]).as_posix(): p for p in snaps[0].rglob("*") if p.is_file()} if snaps else {}


def user_profile(env: dict, name: str, text: str) -> None:
    d = Path(env["MM_HOME"]) / "config" / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.toml").write_text(text)


def test_pull_fetches_what_vllm_loads_and_models_lists_and_removes_it(repos, env):
    with LocalHub(repos) as hub:
        env["HF_ENDPOINT"] = hub.url
        user_profile(env, "tiny", f'model = "{TINY}"\n')
        out = run_mm("pull", "tiny", env=env)  # a profile's model
        assert f"pulling {TINY}" in out.stderr and f"pulled {TINY}" in out.stderr
        files = blobs(env, TINY)
        assert set(files) == {"config.json", "tokenizer.json", "README.md", "model.safetensors"}
        assert files["model.safetensors"].read_bytes() == (repos[TINY] / "model.safetensors").read_bytes()
        assert "up to date" in run_mm("pull", TINY, env=env).stderr  # nothing fetched again
        assert len(hub.served("/model.safetensors")) == 1

    listing = run_mm("models", env=env).stdout
    assert TINY in listing and "ready" in listing and "tiny" in listing and "MiB" in listing
    kept = run_mm("models", "rm", TINY, env=env, input="n\n", check=False)
    assert kept.returncode == 1 and blobs(env, TINY)
    gone = run_mm("models", "rm", TINY, "--yes", env=env)
    assert "freed" in gone.stdout and not blobs(env, TINY)
    assert TINY not in run_mm("models", env=env).stdout.split("not on this machine")[0]


def test_pull_reports_progress_as_bytes_arrive(repos, env, monkeypatch):
    """huggingface_hub hands over bytes in 10 MiB chunks per file: a 0.5 MiB and a 16 MiB shard at
    4 MB/s show their steps seconds before the pull ends."""
    from mmlib.models import hub as models_hub

    monkeypatch.setenv("HF_HUB_CACHE", env["HF_HUB_CACHE"])
    with LocalHub(repos, rate=4_000_000) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        seen: list[tuple[float, int, int]] = []
        plan = models_hub.plan(SHARDED)
        assert set(plan.files) == {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                   "model-00002-of-00002.safetensors"}  # the index's shards, not the extra file
        models_hub.pull(SHARDED, lambda done, total: seen.append((time.monotonic(), done, total)))
        ended = time.monotonic()
    done = [d for _, d, _ in seen]
    between = sorted({d for d in done if 0 < d < plan.to_fetch})
    assert len(between) >= 2, f"progress should move while bytes arrive: {sorted(set(done))}"
    first = min(t for t, d, _ in seen if d == between[0])
    assert ended - first > 1.0  # shown while the download ran, not at its end
    assert done == sorted(done) and seen[-1][1:] == (plan.to_fetch, plan.to_fetch)


def test_an_interrupted_transfer_resumes_where_it_stopped(repos, env):
    """The server drops the connection 11 MiB into a 16 MiB shard: huggingface_hub asks for the rest
    with a Range request (it keeps whole 10 MiB chunks), and the file ends up intact."""
    with LocalHub(repos, cut_after=11 * 1024 * 1024) as hub:
        env["HF_ENDPOINT"] = hub.url
        run_mm("pull", SHARDED, env=env)
        gets = hub.served("/model-00002-of-00002.safetensors")
    assert [g["range"] for g in gets] == [None, "bytes=10485760-"]
    got = blobs(env, SHARDED)["model-00002-of-00002.safetensors"].read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(
        (repos[SHARDED] / "model-00002-of-00002.safetensors").read_bytes()).digest()


def test_a_killed_pull_keeps_finished_files(repos, env):
    """Killed mid-download, the next pull fetches only what was not finished."""
    with LocalHub(repos, rate=1_500_000) as hub:
        env["HF_ENDPOINT"] = hub.url
        proc = subprocess.Popen([sys.executable, "-m", "mmlib", "pull", SHARDED], cwd=ROOT, env={**os.environ, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while "model-00001-of-00002.safetensors" not in blobs(env, SHARDED) and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert "model-00002-of-00002.safetensors" not in blobs(env, SHARDED)
        assert "partial" in run_mm("models", env=env).stdout
        hub.rate = None
        run_mm("pull", SHARDED, env=env)
        assert len(hub.served("/model-00001-of-00002.safetensors")) == 1  # not fetched twice
        assert len(hub.served("/model-00002-of-00002.safetensors")) == 2
    assert "model-00002-of-00002.safetensors" in blobs(env, SHARDED)


def test_offline_uses_the_cache_only(repos, env):
    with LocalHub(repos) as hub:
        env["HF_ENDPOINT"] = hub.url
        off = {**env, "HF_HUB_OFFLINE": "1"}
        r = run_mm("pull", TINY, env=off, check=False)
        assert r.returncode == 1 and "HF_HUB_OFFLINE" in r.stderr and r.stderr.count("\n") == 1
        assert not hub.requests
        run_mm("pull", TINY, env=env)
        n = len(hub.requests)
        run_mm("pull", TINY, env=off)
        assert len(hub.requests) == n  # offline: the hub was not asked


def test_the_disk_check_refuses_before_a_byte_moves(repos, env):
    with LocalHub(repos, sizes={(TINY, "model.safetensors"): 40 << 40}) as hub:  # 40 TiB
        env["HF_ENDPOINT"] = hub.url
        r = run_mm("pull", TINY, env=env, check=False)
        assert r.returncode == 1 and "not enough disk" in r.stderr and "HF_HOME" in r.stderr
        assert r.stderr.count("\n") == 1 and not hub.served("/model.safetensors")


def test_gated_models_need_hf_token(repos, env):
    with LocalHub(repos, gated={TINY: "hf_secret"}) as hub:
        env["HF_ENDPOINT"] = hub.url
        r = run_mm("pull", TINY, env=env, check=False)
        assert r.returncode == 1 and "gated" in r.stderr and "HF_TOKEN" in r.stderr and "Traceback" not in r.stderr
        run_mm("pull", TINY, env={**env, "HF_TOKEN": "hf_secret"})
        assert "model.safetensors" in blobs(env, TINY)


def test_unknown_model_is_one_line(repos, env):
    with LocalHub(repos) as hub:
        env["HF_ENDPOINT"] = hub.url
        r = run_mm("pull", "mm-test/no-such-model", env=env, check=False)
    assert r.returncode == 1 and "no model mm-test/no-such-model" in r.stderr and r.stderr.count("\n") == 1


def test_check_fits_a_model_before_it_is_downloaded(repos, env):
    """`mm check` of a hub model not on disk reads config.json and the safetensors header by range
    requests: the 14 GiB of weights are known, and not one weight byte moved."""
    user_profile(env, "big", f'model = "{BIG}"\n[engine]\nmax_model_len = 8192\n')
    with LocalHub(repos) as hub:
        env["HF_ENDPOINT"] = hub.url
        r = run_mm("check", "big", "--gpu-memory", "12GiB", "--json", env=env, check=False)
        ranges = [g["range"] for g in hub.served("/model.safetensors")]
    fit = [f for f in json.loads(r.stdout) if f["rule"] == "memory-fit"]
    message = fit[0]["message"] if fit else ""
    assert ("does not fit" in message or "would refuse to start" in message) and "weights 14." in message  # 14.19 GiB of parameters (+ vLLM's buffers)
    assert ranges and all(rg and rg.startswith("bytes=") for rg in ranges)
    assert not blobs(env, BIG).get("model.safetensors")

    user_profile(env, "tiny", f'model = "{TINY}"\n[engine]\nmax_model_len = 2048\n')
    with LocalHub(repos) as hub:
        env["HF_ENDPOINT"] = hub.url
        r = run_mm("check", "tiny", "--gpu-memory", "12GiB", "--json", env=env, check=False)
    fit = [f for f in json.loads(r.stdout) if f["rule"] == "memory-fit"]
    assert fit[0]["message"].startswith("fits a 12.00 GiB card")


def test_check_says_why_when_the_hub_is_not_there(env):
    user_profile(env, "far", 'model = "mm-test/unreachable"\n')
    r = run_mm("check", "far", "--gpu-memory", "12GiB", "--json", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"},
               check=False)
    fit = [f for f in json.loads(r.stdout) if f["rule"] == "memory-fit"]
    assert "not on this machine" in fit[0]["message"] and "cannot reach the hub" in fit[0]["message"]


@pytest.mark.slow
def test_up_of_a_hub_model_pulls_first_and_vllm_finds_it_in_the_cache(env):
    """The real path: `mm up` of a profile whose model is a hub id not on disk pulls it (with
    progress) before the daemon starts vLLM, which then loads it from the cache without a download."""
    from mmlib.profiles import embedded

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    user_profile(env, "smolhub", f'extends = "default"\nmodel = "{hub_id}"\nserved_model_name = "smolhub"\n'
                                 "aliases = []\n")
    with LocalHub({hub_id: embedded.ensure_converted()}) as hub:
        env["HF_ENDPOINT"] = hub.url
        try:
            up = run_mm("up", "smolhub", env=env)
            answer = run_mm("chat", "smolhub", "--once", "What is the capital of France?", env=env).stdout
        finally:
            run_mm("daemon", "stop", env=env, check=False)
        full_gets = [g for g in hub.served("/model.safetensors") if not g["range"]]
    assert f"pulling {hub_id}" in up.stderr and "smolhub: awake" in up.stdout
    assert len(full_gets) == 1  # the pull's; vLLM read the cache (and at most the header by range)
    assert answer.strip()


def test_the_embedded_model_is_not_pulled(env):
    out = run_mm("pull", "default", env=env)  # converts it where the shared test cache lacks it
    assert "ships with mm" in out.stderr
    assert "embedded:SmolLM2-135M-Instruct" in run_mm("models", env=env).stdout
