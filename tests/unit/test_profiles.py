"""Profiles: loading, `extends` merging, validation errors that name file, key and fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmlib.errors import ProfileError
from mmlib.profiles.memory import GIB, MemorySpec
from mmlib.profiles.profile import list_profile_names, load_profile, merge, to_dict


def write(mm_env, name: str, text: str) -> Path:
    d = Path(mm_env["MM_HOME"]) / "config" / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.toml"
    p.write_text(text)
    return p


def test_shipped_profiles_all_load(mm_env):
    names = list_profile_names()
    for required in ("default", "chat", "baseline", "perf", "voice", "ocr"):
        assert required in names
    for name in names:
        load_profile(name)


def test_perf_extends_baseline_and_merges_engine_tables(mm_env):
    perf, baseline = load_profile("perf"), load_profile("baseline")
    assert perf.model == baseline.model
    assert "quantization" not in perf.engine  # vLLM reads it from the checkpoint: `mm perf MODEL` takes any kind
    assert perf.engine["kv_cache_dtype"] == "fp8"
    assert perf.engine["disable_hybrid_kv_cache_manager"] is True
    assert baseline.memory == MemorySpec(context=8192, sequences=256, kv_fill=True)
    # [memory] merges key by key too: perf keeps baseline's kv_cache = "fill", overrides the rest
    assert perf.memory == MemorySpec(context=None, sequences=64, kv_fill=True, offload_fit=True)


def test_memory_table_reads_tokens_and_sizes(mm_env):
    write(mm_env, "m", 'model = "x"\n[memory]\ncontext = "16k"\nsequences = 8\nkv_cache = "4GiB"\n'
                       'offload = "16GiB"\n')
    p = load_profile("m")
    assert p.memory == MemorySpec(context=16384, sequences=8, kv_cache=4 * GIB, offload=16 * GIB)
    assert p.max_num_seqs == 8
    assert to_dict(p)["memory"] == {"context": 16384, "sequences": 8, "kv_cache": "4GiB", "offload": "16GiB"}
    write(mm_env, "n", 'model = "x"\n[memory]\nkv_tokens = 131072\n')
    assert load_profile("n").memory == MemorySpec(kv_tokens=131072)  # context "fit", 16 sequences by default
    assert to_dict(load_profile("n"))["memory"] == {"context": "fit", "kv_tokens": 131072}


@pytest.mark.parametrize("table, key, fragment", [
    ("contxt = 8192", "memory.contxt", "did you mean 'memory.context'"),
    ("context = 8", "memory.context", "16-10,485,760"),
    ("context = true", "memory.context", "8192 (or \"fit\")"),
    ("sequences = 0", "memory.sequences", "memory.sequences = 16"),
    ("kv_cache = \"lots\"", "memory.kv_cache", '"fill"'),
    ("kv_cache = -5", "memory.kv_cache", "4GiB"),
    ("kv_tokens = 4096\nkv_cache = \"1GiB\"", "memory.kv_cache", "keep one of them"),
    ("context = 8192\nkv_tokens = 4096", "memory.kv_tokens", "one request of context = 8,192"),
    ("offload = \"fill\"", "memory.offload", '"fit"'),
])
def test_memory_table_errors_are_one_line_and_name_the_key(mm_env, table, key, fragment):
    write(mm_env, "bad", f'model = "x"\n[memory]\n{table}\n')
    with pytest.raises(ProfileError) as e:
        load_profile("bad")
    assert e.value.key == key and fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("engine, key", [("max_model_len = 4096", "engine.max_model_len"),
                                         ("max_num_seqs = 8", "engine.max_num_seqs"),
                                         ("kv_cache_memory_bytes = 1000000", "engine.kv_cache_memory_bytes")])
def test_memory_and_engine_cannot_both_decide(mm_env, engine, key):
    write(mm_env, "both", f'model = "x"\n[memory]\ncontext = 8192\n[engine]\n{engine}\n')
    with pytest.raises(ProfileError, match=r"\[memory\] decides it") as e:
        load_profile("both")
    assert e.value.key == key
    write(mm_env, "off", 'model = "x"\n[memory]\noffload = "fit"\n[engine]\nkv_offloading_size = 8\n')
    with pytest.raises(ProfileError, match="memory.offload"):
        load_profile("off")


def test_with_model_remembers_the_profile_model(mm_env):
    p = load_profile("perf")
    assert not p.model_replaced
    q = p.with_model("Qwen/Qwen2.5-3B-Instruct-AWQ").with_model("x/y")
    assert q.base_model == p.model and q.model_replaced
    assert not p.with_model(p.model).model_replaced


def test_gpu_budget_in_config_and_env(mm_env, monkeypatch):
    from mmlib.profiles.config import load_config

    assert load_config().gpu_budget is None
    cfg = Path(mm_env["MM_HOME"]) / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('gpu_budget = "12GiB"\n')
    assert load_config().gpu_budget == 12 * GIB
    cfg.write_text("gpu_budget = 8589934592\n")
    assert load_config().gpu_budget == 8 * GIB
    monkeypatch.setenv("MM_GPU_BUDGET", "11000MiB")
    assert load_config().gpu_budget == 11000 << 20
    monkeypatch.setenv("MM_GPU_BUDGET", "a lot")
    with pytest.raises(ProfileError, match="MM_GPU_BUDGET: gpu_budget: 'a lot' is not a GPU memory budget"):
        load_config()
    monkeypatch.delenv("MM_GPU_BUDGET")
    cfg.write_text("gpu_budget = true\n")
    with pytest.raises(ProfileError, match='gpu_budget: expected a size such as "12GiB"'):
        load_config()


def test_ram_budget_in_config(mm_env):
    from mmlib.profiles.config import load_config

    assert load_config().ram_budget is None  # derived by the scheduler from the machine's RAM
    cfg = Path(mm_env["MM_HOME"]) / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('ram_budget = "24GiB"\n')
    assert load_config().ram_budget == 24 * GIB
    cfg.write_text('ram_budget = "lots"\n')
    with pytest.raises(ProfileError, match=r"config.toml: ram_budget: 'lots' is not a RAM budget \(fix: write it"):
        load_config()


def test_switch_settings_in_config(mm_env):
    from mmlib.profiles.config import load_config

    assert load_config().switch_pause_in_flight is True and load_config().switch_max_wait == 1.0
    cfg = Path(mm_env["MM_HOME"]) / "config" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("switch_pause_in_flight = false\nswitch_max_wait = 0.5\nswitch_pause_after = 30\n")
    assert load_config().switch_pause_in_flight is False and load_config().switch_max_wait == 0.5
    assert load_config().switch_pause_after == 30
    cfg.write_text('switch_pause_in_flight = "no"\n')
    with pytest.raises(ProfileError, match="switch_pause_in_flight: expected true"):
        load_config()
    cfg.write_text("switch_max_wait = true\n")  # a bool is not a number of seconds
    with pytest.raises(ProfileError, match="switch_max_wait: expected seconds"):
        load_config()


def test_merge_is_deep_for_tables_only():
    base = {"engine": {"a": 1, "b": 2}, "aliases": ["x"]}
    assert merge(base, {"engine": {"b": 3}, "aliases": ["y"]}) == {"engine": {"a": 1, "b": 3}, "aliases": ["y"]}


def test_user_profile_shadows_shipped_one(mm_env):
    write(mm_env, "default", 'model = "/models/mine"\n')
    assert load_profile("default").model == "/models/mine"
    assert load_profile("default").served_model_name == "mine"


def test_unknown_profile_suggests_close_name(mm_env):
    with pytest.raises(ProfileError, match="did you mean 'perf'"):
        load_profile("prf")


def test_broken_toml_names_file_and_line(mm_env):
    p = write(mm_env, "broken", 'model = "x"\nengine = [\n')
    with pytest.raises(ProfileError) as e:
        load_profile("broken")
    assert str(p) in str(e.value) and "line" in str(e.value)


@pytest.mark.parametrize("text, key, fragment", [
    ('modle = "x"\n', "modle", "did you mean 'model'"),
    ('model = "x"\nport = "80"\n', "port", "integer"),
    ('model = "x"\nport = 70000\n', "port", "out of range"),
    ('model = "x"\nrestart = "always"\n', "restart", "on-failure"),
    ('model = "x"\n[sleep]\nlevel = 3\n', "sleep.level", "1 or 2"),
    ('model = "x"\n[sleep]\nenabeld = true\n', "sleep.enabeld", "did you mean 'sleep.enabled'"),
    ('model = "x"\n[env]\nA = [1]\n', "env.A", "string"),
    ('model = "x"\nstartup_timeout = -1\n', "startup_timeout", "out of range"),
    ('description = "no model"\n', "model", "missing"),
    ('model = "x"\nengine = 3\n', "engine", "table"),
])
def test_validation_errors_name_the_key(mm_env, text, key, fragment):
    write(mm_env, "bad", text)
    with pytest.raises(ProfileError) as e:
        load_profile("bad")
    assert e.value.key == key
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_extends_cycle_is_an_error(mm_env):
    write(mm_env, "a", 'extends = "b"\nmodel = "x"\n')
    write(mm_env, "b", 'extends = "a"\n')
    with pytest.raises(ProfileError, match="cycle"):
        load_profile("a")


def test_profile_names_are_not_paths(mm_env):
    with pytest.raises(ProfileError, match="not a profile name"):
        load_profile("../../etc/passwd")


def test_with_model_overrides_model_and_name(mm_env):
    p = load_profile("chat").with_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert p.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert p.names == ("Qwen2.5-0.5B-Instruct",)


def test_any_memory_table_loads_or_fails_with_one_line(mm_env):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mmlib.profiles.memory import KEYS

    values = st.one_of(st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
                       st.sampled_from(["fit", "fill", "4GiB", "16k", "0", "-1GiB", "1e3", ""]), st.text(max_size=12))

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(table=st.dictionaries(st.sampled_from(KEYS), values, max_size=5))
    def check(table):
        import tomli_w

        write(mm_env, "fuzz", tomli_w.dumps({"model": "x", "memory": table}))
        try:
            load_profile("fuzz")
        except ProfileError as e:
            assert "\n" not in str(e) and e.key.startswith("memory.")

    check()
