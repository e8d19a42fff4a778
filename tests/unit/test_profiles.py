"""Profiles: loading, `extends` merging, validation errors that name file, key and fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmlib.errors import ProfileError
from mmlib.profiles.profile import list_profile_names, load_profile, merge


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
    perf = load_profile("perf")
    assert perf.model == load_profile("baseline").model
    assert perf.engine["quantization"] == "awq"  # inherited
    assert perf.engine["max_model_len"] == 16384  # overridden
    assert perf.engine["kv_cache_dtype"] == "fp8"
    assert perf.engine["disable_hybrid_kv_cache_manager"] is True


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
