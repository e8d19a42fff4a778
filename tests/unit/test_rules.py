"""Every rule in mmlib.guard.rules.RULES: a profile and machine that trigger it, and one that does not."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import pytest

from mmlib.guard import rules
from mmlib.guard.modelinfo import model_max_len
from mmlib.guard.rules import ERROR, INFO, WARN, Facts
from mmlib.profiles.memory import MemorySpec
from mmlib.profiles.profile import Profile, SleepSettings, load_profile
from mmlib.profiles.vllm_cmd import engine_int
from mmlib.system.nvml import GIB, GpuInfo

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0))
RTX3060 = GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GIB, 11 * GIB, (8, 6))
HERE = Path(__file__).resolve().parent
HOPPER, AMPERE, CPU = Facts(gpus=(H100,)), Facts(gpus=(RTX3060,)), Facts(is_cpu=True)
AWQ_CONFIG = {"torch_dtype": "float16", "max_position_embeddings": 32768,
              "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
TWO_H100 = Facts(gpus=(H100, dataclasses.replace(H100, index=1)))
QWEN_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4}


def cards(p: Profile, gpus: int | tuple[int, ...], parallel: str = "tensor") -> Profile:
    count, indices = (gpus, ()) if isinstance(gpus, int) else (len(gpus), gpus)
    return dataclasses.replace(p, gpus=count, gpu_indices=indices, parallel=parallel if count > 1 else "")


def profile(engine=None, env=None, sleep=False, port=None, model="Qwen/Qwen2.5-7B-Instruct-AWQ",
            memory=None) -> Profile:
    return Profile(name="t", source="/profiles/t.toml", model=model, served_model_name="t", port=port,
                   engine=MappingProxyType(engine or {}), env=MappingProxyType(env or {}),
                   sleep=SleepSettings(enabled=sleep), memory=memory)


def busy(host, port):
    return port == 8001


# rule id -> (profile, facts) that trigger it, (profile, facts) that do not
CASES = {
    "kv-offload-hybrid": (
        (profile({"kv_offloading_size": 16, "disable_hybrid_kv_cache_manager": False}), AMPERE),
        (profile({"kv_offloading_size": 16, "disable_hybrid_kv_cache_manager": True}), AMPERE)),
    "kv-offload-hybrid-unset": (
        (profile({"kv_offloading_backend": "native", "kv_offloading_size": 16}), AMPERE),
        (profile({"kv_offloading_size": 16, "disable_hybrid_kv_cache_manager": True}), AMPERE)),
    "kv-offload-no-size": (
        (profile({"kv_offloading_backend": "native", "disable_hybrid_kv_cache_manager": True}), AMPERE),
        (profile({"kv_offloading_backend": "native", "disable_hybrid_kv_cache_manager": True},
                 memory=MemorySpec(offload_fit=True)), AMPERE)),
    "awq-fp16-fp8kv-fa3": (
        (profile({"kv_cache_dtype": "fp8"}), Facts(gpus=(H100,), model_config=AWQ_CONFIG)),
        (profile({"kv_cache_dtype": "fp8", "dtype": "bfloat16"}), Facts(gpus=(H100,), model_config=AWQ_CONFIG))),
    "sleep-mode-on-cpu": (
        (profile({"enable_sleep_mode": True}), CPU),
        (profile({"enable_sleep_mode": True}), AMPERE)),
    "sleep-mode-in-engine": (
        (profile({"enable_sleep_mode": True}), AMPERE),
        (profile({}, sleep=True), AMPERE)),
    "sleep-falls-back-on-cpu": (
        (profile({}, sleep=True), CPU),
        (profile({}, sleep=True), AMPERE)),
    "port-in-use": (
        (profile(port=8001), Facts(port_in_use=busy)),
        (profile(port=8002), Facts(port_in_use=busy))),
    "max-model-len-over-model": (
        (profile({"max_model_len": 65536}), Facts(model_config=AWQ_CONFIG)),
        (profile({"max_model_len": "32k"}), Facts(model_config=AWQ_CONFIG))),
    "memory-context-over-model": (
        (profile(memory=MemorySpec(context=65536)), Facts(model_config=AWQ_CONFIG)),
        (profile(memory=MemorySpec(context=32768)), Facts(model_config=AWQ_CONFIG))),
    "model-path-missing": (
        (profile(model="/nowhere/model"), AMPERE),
        (profile(model=str(HERE)), AMPERE)),
    "model-weights-missing": (
        (profile(model=str(HERE)), AMPERE),  # a folder without weight files
        (profile({"load_format": "dummy"}, model=str(HERE)), AMPERE)),
    "memory-share-range": (
        (profile({"gpu_memory_utilization": 85}), AMPERE),
        (profile({"gpu_memory_utilization": 0.85}), AMPERE)),
    "sleep-endpoints-on-tcp": (
        (profile(sleep=True, port=8000), AMPERE),
        (profile(sleep=True, port=8000), CPU)),  # the CPU build has no sleep mode, so no dev endpoints
    "env-vllm-attention-backend": (
        (profile(env={"VLLM_ATTENTION_BACKEND": "FLASHINFER"}), AMPERE),
        (profile({"attention_backend": "FLASHINFER"}), AMPERE)),
    "env-vllm-use-v1": (
        (profile(env={"VLLM_USE_V1": "1"}), AMPERE),
        (profile(env={"VLLM_USE_V1": "1"}), Facts(vllm_env=frozenset({"VLLM_USE_V1"})))),  # an old vLLM reads it
    "gpus-too-few": (
        (cards(profile(), 2), HOPPER),
        (cards(profile(), 2), TWO_H100)),
    "gpus-not-here": (
        (cards(profile(), (1,)), HOPPER),
        (cards(profile(), (1,)), TWO_H100)),
    "tensor-split": (  # 28 heads and 4 KV heads: 2 and 4 cards split it, 3 do not
        (cards(profile(), 3), Facts(gpus=TWO_H100.gpus * 2, model_config=QWEN_7B)),
        (cards(profile(), 4), Facts(gpus=TWO_H100.gpus * 2, model_config=QWEN_7B))),
}


def fired(p: Profile, facts: Facts) -> set[str]:
    return {f.rule for f in rules.evaluate(p, facts)}


def test_every_rule_has_a_case():
    assert {r.id for r in rules.RULES} == set(CASES)
    assert len({r.id for r in rules.RULES}) == len(rules.RULES)


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule_triggers(rule_id):
    (p, facts), _ = CASES[rule_id]
    found = [f for f in rules.evaluate(p, facts) if f.rule == rule_id]
    assert len(found) == 1
    f = found[0]
    assert f.file == "/profiles/t.toml" and f.key and f.message
    assert f.severity in (ERROR, WARN, INFO)
    assert f.fix or f.severity == INFO
    assert "\n" not in f.line()


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule_stays_quiet(rule_id):
    _, (p, facts) = CASES[rule_id]
    assert rule_id not in fired(p, facts)


def test_fp8_awq_rule_needs_hopper_fa3_and_fp16():
    fp8 = profile({"kv_cache_dtype": "fp8"})
    assert "awq-fp16-fp8kv-fa3" not in fired(fp8, Facts(gpus=(RTX3060,), model_config=AWQ_CONFIG))  # FA2
    assert "awq-fp16-fp8kv-fa3" not in fired(profile({"kv_cache_dtype": "fp8", "attention_backend": "FLASHINFER"}),
                                             Facts(gpus=(H100,), model_config=AWQ_CONFIG))
    assert "awq-fp16-fp8kv-fa3" not in fired(profile({}), Facts(gpus=(H100,), model_config=AWQ_CONFIG))
    bf16_ckpt = {**AWQ_CONFIG, "torch_dtype": "bfloat16"}
    assert "awq-fp16-fp8kv-fa3" not in fired(fp8, Facts(gpus=(H100,), model_config=bf16_ckpt))
    # no config.json on disk: an AWQ hub id is taken as fp16 (AWQ checkpoints are)
    assert "awq-fp16-fp8kv-fa3" in fired(fp8, HOPPER)
    f = [f for f in rules.evaluate(fp8, HOPPER) if f.rule == "awq-fp16-fp8kv-fa3"][0]
    assert f.severity == ERROR and 'dtype = "bfloat16"' in f.fix and "H100" in f.message


def test_removed_env_from_the_shell_is_named_as_such():
    facts = Facts(gpus=(RTX3060,), environ={"VLLM_ATTENTION_BACKEND": "TRITON_ATTN"})
    f = [f for f in rules.evaluate(profile(), facts) if f.rule == "env-vllm-attention-backend"][0]
    assert "from your shell" in f.key and '"TRITON_ATTN"' in f.fix


def test_shipped_profiles_on_a_12gb_ampere_card_have_no_errors(mm_env):
    for name in ("default", "chat", "baseline", "perf", "ocr", "voice-llm", "voice-stt"):
        p = load_profile(name)
        errors = [f for f in rules.evaluate(p, AMPERE) if f.severity == ERROR]
        assert errors == [], name


def test_shipped_chat_profile_dies_on_hopper_and_perf_does_not(mm_env):
    assert "awq-fp16-fp8kv-fa3" in fired(load_profile("chat"), HOPPER)
    assert "awq-fp16-fp8kv-fa3" not in fired(load_profile("perf"), HOPPER)  # FLASHINFER, not FA3


def test_weights_found_in_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "model-weights-missing" not in fired(profile(model=str(tmp_path)), AMPERE)
    assert not {"model-weights-missing", "model-path-missing"} & fired(profile(model="org/name"), AMPERE)


def test_engine_int_and_model_max_len():
    assert engine_int("16k") == 16000 and engine_int(8192) == 8192 and engine_int("x") is None
    assert engine_int(True) is None
    assert model_max_len({"max_position_embeddings": 4096, "n_positions": 2048}) == 2048
    assert model_max_len({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4}}) is None
    assert model_max_len({"text_config": {"max_position_embeddings": 8192}}) == 8192
    assert model_max_len(None) is None
