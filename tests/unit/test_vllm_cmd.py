"""Profile -> vLLM argv and environment."""
from __future__ import annotations

import json

import pytest

from mmlib.profiles import vllm_cmd
from mmlib.profiles.profile import load_profile
from mmlib.profiles.memory import GIB
from mmlib.profiles.vllm_cmd import Sizes, VllmInstall, engine_args, server_argv, server_env


def test_engine_args_spelling():
    argv = engine_args({"max_model_len": 4096, "enforce_eager": True, "enable_prefix_caching": False,
                        "middleware": ["a", "b"], "override_generation_config": {"temperature": 0.2},
                        "port": 1, "served-model-name": "x"})
    assert argv == ["--max-model-len", "4096", "--enforce-eager", "--no-enable-prefix-caching",
                    "--middleware", "a", "--middleware", "b",
                    "--override-generation-config", json.dumps({"temperature": 0.2}, separators=(",", ":"))]


def test_perf_argv(mm_env, monkeypatch):
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: VllmInstall("vllm", "0.26.0"))
    argv = server_argv(load_profile("perf"), 8123, python="python")
    assert argv[:5] == ["python", "-m", "vllm.entrypoints.cli.main", "serve", "Qwen/Qwen2.5-7B-Instruct-AWQ"]
    joined = " ".join(argv)
    for part in ("--host 127.0.0.1", "--port 8123", "--served-model-name qwen2.5-7b-instruct-perf perf",
                 "--enable-sleep-mode", "--kv-cache-dtype fp8", "--kv-offloading-backend native",
                 "--disable-hybrid-kv-cache-manager", "--attention-backend FLASHINFER",
                 "--async-scheduling", "--max-num-seqs 64"):
        assert part in joined
    # what depends on the card and the model's shapes comes from guard.fit, handed in as `derived`
    assert "--max-model-len" not in joined and "--kv-offloading-size" not in joined
    derived = Sizes(context=16384, kv_cache_bytes=4996121320, offload_bytes=7 * GIB, sequences=64)
    joined = " ".join(server_argv(load_profile("perf"), 8123, python="python", derived=derived))
    for part in ("--max-model-len 16384", "--kv-cache-memory-bytes 4996121320", "--kv-offloading-size 7"):
        assert part in joined
    assert joined.count("--max-num-seqs") == 1
    env = server_env(load_profile("perf"), base={})
    assert env == {"VLLM_SERVER_DEV_MODE": "1"}


def test_memory_table_gives_context_and_sequences_without_a_card(mm_env):
    joined = " ".join(server_argv(load_profile("chat"), 1))
    assert "--max-model-len 8192" in joined and "--max-num-seqs 16" in joined
    assert "--gpu-memory-utilization" not in joined  # chat says bytes; only guard.fit knows them


def test_cpu_build_gets_cpu_env_and_no_sleep_mode(mm_env, monkeypatch):
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: VllmInstall("vllm", "0.32.0+cpu"))
    p = load_profile("chat")
    assert "--enable-sleep-mode" not in server_argv(p, 1)
    assert server_env(p, base={}) == {"VLLM_TARGET_DEVICE": "cpu"}


def test_embedded_model_resolves_to_cache(mm_env):
    argv = server_argv(load_profile("default"), 1)
    assert argv[4].endswith("models/SmolLM2-135M-Instruct")
    assert "--enforce-eager" in argv


def test_profile_env_wins_over_mm_defaults(mm_env, monkeypatch):
    from pathlib import Path

    d = Path(mm_env["MM_HOME"]) / "config" / "profiles"
    d.mkdir(parents=True)
    (d / "x.toml").write_text('model = "m"\n[env]\nVLLM_TARGET_DEVICE = "cuda"\nHF_TOKEN = "t"\n')
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: VllmInstall("vllm", "0.32.0+cpu"))
    assert server_env(load_profile("x"), base={}) == {"VLLM_TARGET_DEVICE": "cuda", "HF_TOKEN": "t"}


@pytest.mark.parametrize("code, keeps", [
    ("class PauseState: PAUSED_ALL = 2\n# _reset_caches(reset_running_requests=True)\n", True),  # vLLM 0.26+
    ("def sleep(self, level: int = 1): ...\n", False),  # older: a sleep would abort the requests in flight
])
def test_pausing_requests_is_read_from_the_installed_vllms_own_engine(tmp_path, monkeypatch, code, keeps):
    core = tmp_path / "vllm" / "v1" / "engine" / "core.py"
    core.parent.mkdir(parents=True)
    core.write_text(code)

    class Dist:
        def locate_file(self, path):
            return tmp_path / path
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: VllmInstall("vllm", "0.26.0"))
    monkeypatch.setattr(vllm_cmd.metadata, "distribution", lambda name: Dist())
    vllm_cmd.sleep_keeps_requests.cache_clear()
    try:
        assert vllm_cmd.sleep_keeps_requests() is keeps
    finally:
        vllm_cmd.sleep_keeps_requests.cache_clear()


def test_no_pausing_on_the_cpu_build(monkeypatch):
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: VllmInstall("vllm", "0.32.0+cpu"))
    vllm_cmd.sleep_keeps_requests.cache_clear()
    try:
        assert vllm_cmd.sleep_keeps_requests() is False
    finally:
        vllm_cmd.sleep_keeps_requests.cache_clear()
