"""One name means one profile (served names, aliases and profile names never reach two files), vLLM's
dev endpoints never leave the machine, and [engine] keys are one key however they are spelt."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from mmlib.cli import main
from mmlib.errors import ProfileError
from mmlib.guard import checks
from mmlib.guard.rules import ERROR, Facts
from mmlib.profiles import vllm_cmd
from mmlib.profiles.profile import load_all, load_profile
from mmlib.profiles.vllm_cmd import VllmInstall, server_argv, server_env

from tests.unit.test_checks import SPEC
from tests.unit.test_profiles import write


def owners(profiles) -> dict[str, str]:
    """Every name a client may send -> the profile that answers it (every name once)."""
    out: dict[str, str] = {}
    for p in profiles:
        for n in p.names:
            assert n not in out, f"{n} is served by {out[n]} and {p.name}"
            out[n] = p.name
    return out


# --- names --------------------------------------------------------------------------------------------
def test_shipped_profiles_claim_each_name_once(mm_env):
    profiles, errors = load_all()
    assert errors == []
    assert owners(profiles)["SmolLM2-135M-Instruct"] == "default"


def test_extends_does_not_inherit_names(mm_env):
    write(mm_env, "fast", 'extends = "default"\n[engine]\nenforce_eager = false\n')
    fast = load_profile("fast")
    assert fast.names == ("fast",)  # served under its own name, not default's smollm2 and alias
    assert load_profile("perf").aliases == ("perf",)  # a file's own names stay its own
    profiles, errors = load_all()
    assert errors == []
    assert owners(profiles)["SmolLM2-135M-Instruct"] == "default" and owners(profiles)["fast"] == "fast"


def test_a_duplicate_alias_is_an_error_for_the_later_file_which_does_not_serve_it(mm_env):
    mine = write(mm_env, "mine", 'model = "x/y"\naliases = ["chat", "mine-too"]\n')
    profiles, errors = load_all()
    assert len(errors) == 1
    e = errors[0]
    assert e.file == str(mine) and e.key == "aliases"
    assert "'chat'" in str(e) and str(load_profile("chat").source) in str(e) and "\n" not in str(e)
    by_name = {p.name: p for p in profiles}
    assert by_name["mine"].names == ("y", "mine-too")  # the ambiguous alias is dropped, the rest served
    assert owners(profiles)["chat"] == "chat"


def test_a_duplicate_served_name_keeps_the_later_profile_out(mm_env):
    a = write(mm_env, "a", 'model = "x/one"\nserved_model_name = "same"\n')
    b = write(mm_env, "b", 'model = "x/two"\nserved_model_name = "same"\naliases = ["bee"]\n')
    profiles, errors = load_all()
    assert [(e.file, e.key) for e in errors] == [(str(b), "served_model_name")]
    assert str(a) in str(errors[0])
    assert owners(profiles)["same"] == "a" and "bee" not in owners(profiles)
    assert "b" not in {p.name for p in profiles}


def test_the_proxys_index_routes_each_name_to_its_first_file(mm_env):
    from mmlib.serve.proxy import ModelIndex

    write(mm_env, "aaa", 'model = "x/y"\naliases = ["SmolLM2-135M-Instruct", "aaa-too"]\n')
    write(mm_env, "zzz", 'model = "x/z"\nserved_model_name = "aaa-too"\n')
    index = ModelIndex(load_all)
    assert index.lookup("SmolLM2-135M-Instruct").name == "default"
    assert index.lookup("aaa-too").name == "aaa" and index.lookup("y").name == "aaa"
    assert "zzz" not in {p.name for p in index.profiles}  # its served name is taken: /v1/models leaves it out


def test_user_files_come_after_shipped_ones(mm_env):
    # "aaa" sorts before every shipped profile, yet the shipped smollm2 keeps its name.
    aaa = write(mm_env, "aaa", 'model = "x/y"\nserved_model_name = "smollm2"\n')
    profiles, errors = load_all()
    assert [e.file for e in errors] == [str(aaa)] and owners(profiles)["smollm2"] == "default"


def test_an_alias_that_names_another_profile_is_an_error(mm_env):
    mine = write(mm_env, "mine", 'model = "x/y"\naliases = ["perf"]\n')
    profiles, errors = load_all()
    assert [(e.file, e.key) for e in errors] == [(str(mine), "aliases")]
    assert "profile 'perf'" in str(errors[0])
    # a profile named after another's alias: the alias gives way, the profile name is `mm up`'s
    stt = write(mm_env, "stt", 'model = "x/stt"\n')
    _, errors = load_all()
    assert any(e.key == "aliases" and "'stt'" in str(e) and str(stt) in str(e) for e in errors)


def test_stacks_claim_only_their_profile_names(mm_env):
    write(mm_env, "pair", 'stack = ["chat", "default"]\n')
    write(mm_env, "trio", 'stack = ["chat", "default", "ocr"]\n')
    profiles, errors = load_all()
    assert errors == [] and {"pair", "trio", "voice"} <= {p.name for p in profiles}


def test_own_names_may_repeat_within_one_file(mm_env):
    write(mm_env, "solo", 'model = "x/y"\nserved_model_name = "solo"\naliases = ["solo", "s", "s"]\n')
    p = load_profile("solo")
    assert p.names == ("solo", "s")
    assert server_argv(p, 1).count("--served-model-name") == 1


def test_mm_check_exits_1_naming_both_files(mm_env, monkeypatch):
    monkeypatch.setattr(checks, "load_spec", lambda **kw: SPEC)
    mine = write(mm_env, "mine", 'model = "x/y"\nserved_model_name = "smollm2"\n')
    default = load_profile("default").source
    for args in (["check"], ["check", "mine"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, r.output
        line = next(line for line in r.output.splitlines() if "smollm2" in line)
        assert line.startswith("error") and str(mine) in line and default in line
    r = CliRunner().invoke(main, ["check", "default", "-q"])  # the first file keeps its name
    assert "smollm2" not in r.output


def test_preflight_refuses_a_profile_whose_name_is_taken(mm_env):
    write(mm_env, "mine", 'model = "x/y"\naliases = ["chat"]\n')
    found = checks.check(["mine"], facts=Facts(), spec=SPEC)
    assert any(f.severity == ERROR and f.key == "aliases" and f.rule == "profile" for f in found)


# --- vLLM's dev endpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, key", [
    ('host = "0.0.0.0"\napi_key = "k"\nsleep = true\n', "host"),
    ('host = "192.168.1.5"\napi_key = "k"\n[env]\nVLLM_SERVER_DEV_MODE = "1"\n', "env.VLLM_SERVER_DEV_MODE"),
    ('host = "0.0.0.0"\n', "api_key"),  # beyond this machine only behind a key
])
def test_dev_endpoints_never_leave_the_machine(mm_env, text, key):
    write(mm_env, "lan", 'model = "x/y"\n' + text)
    with pytest.raises(ProfileError) as e:
        load_profile("lan")
    assert e.value.key == key and "lan.toml" in str(e.value) and "\n" not in str(e.value)
    assert e.value.fix


@pytest.mark.parametrize("text", [
    'host = "0.0.0.0"\napi_key = "k"\nport = 8000\n',  # no sleep mode: no dev endpoints, the key guards /v1
    'port = 8000\nsleep = true\n',  # loopback: sleep mode works (a warning says who else can reach it)
    'host = "localhost"\nsleep = true\n',
    'host = "::1"\nsleep = true\n',
])
def test_what_may_listen_on_tcp(mm_env, text):
    write(mm_env, "tcp", 'model = "x/y"\n' + text)
    load_profile("tcp")


def test_no_dev_mode_from_the_shell_for_a_server_that_does_not_sleep(mm_env, monkeypatch):
    monkeypatch.setattr(vllm_cmd, "installed_vllm", lambda: VllmInstall("vllm", "0.26.0"))
    write(mm_env, "lan", 'model = "x/y"\nhost = "0.0.0.0"\napi_key = "k"\n')
    env = server_env(load_profile("lan"), base={"VLLM_SERVER_DEV_MODE": "1", "PATH": "/bin"})
    assert "VLLM_SERVER_DEV_MODE" not in env and env["PATH"] == "/bin"
    assert server_env(load_profile("chat"), base={})["VLLM_SERVER_DEV_MODE"] == "1"


# --- engine keys --------------------------------------------------------------------------------------
def test_kebab_and_snake_engine_keys_are_one_key(mm_env):
    write(mm_env, "k", 'model = "x/y"\n[engine]\nmax-num-seqs = 8\nenforce-eager = true\n')
    p = load_profile("k")
    assert dict(p.engine) == {"max_num_seqs": 8, "enforce_eager": True}
    write(mm_env, "kid", 'extends = "k"\n[engine]\nmax_num_seqs = 4\n')  # overrides the parent's spelling
    argv = server_argv(load_profile("kid"), 1)
    assert argv.count("--max-num-seqs") == 1 and argv[argv.index("--max-num-seqs") + 1] == "4"


def test_both_spellings_at_once_is_an_error_naming_both(mm_env):
    write(mm_env, "k", 'model = "x/y"\n[engine]\nmax_num_seqs = 8\nmax-num-seqs = 4\n')
    with pytest.raises(ProfileError) as e:
        load_profile("k")
    assert "engine.max_num_seqs" in str(e.value) and "engine.max-num-seqs" in str(e.value)
    assert "k.toml" in str(e.value)


@pytest.mark.parametrize("key, top", [("served-model-name", "served_model_name"), ("served_model_name",
                                      "served_model_name"), ("port", "port"), ("host", "host"), ("model", "model"),
                                      ("api-key", "api_key"), ("uds", "")])
def test_reserved_engine_keys_are_refused_however_spelt(mm_env, key, top):
    write(mm_env, "r", f'model = "x/y"\n[engine]\n{key} = "v"\n')
    with pytest.raises(ProfileError) as e:
        load_profile("r")
    assert e.value.key == f"engine.{key}" and "r.toml" in str(e.value)
    assert (f"`{top}`" in e.value.fix) if top else e.value.fix
