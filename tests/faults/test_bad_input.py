"""Hostile or broken input: profiles, HTTP bodies, names. A clear error, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmlib.errors import ProfileError
from mmlib.profiles.profile import SCALAR_KEYS, load_profile

ROOT = Path(__file__).resolve().parents[2]

# Only what TOML can hold (no None): tomli_w writes the document, mm must read it back safely.
scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                    st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3))
toml_values = st.recursive(scalars,
                           lambda inner: st.dictionaries(st.text(min_size=1, max_size=12), inner, max_size=4),
                           max_leaves=8)
keys = st.one_of(st.sampled_from([*SCALAR_KEYS, "engine", "env", "sleep", "memory"]), st.text(min_size=1, max_size=20))
profiles = st.dictionaries(keys, toml_values, max_size=8)

FUZZ_CASES = 400


# derandomize: the same 400 cases every run, so CI is repeatable; change FUZZ_CASES to explore more.
@settings(max_examples=FUZZ_CASES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=profiles)
def test_generated_profiles_load_or_fail_with_a_profile_error(mm_env, doc):
    d = Path(mm_env["MM_HOME"]) / "config" / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    (d / "fuzz.toml").write_text(tomli_w.dumps(doc))
    try:
        load_profile("fuzz")
    except ProfileError as e:
        assert "\n" not in str(e) and "fuzz.toml" in str(e)


@pytest.mark.parametrize("text", [
    'extends = "fuzz"\nmodel = "x"\n',                   # extends itself
    'model = "x"\n' + "[engine]\n" + "".join(f"k{i} = {i}\n" for i in range(2000)),  # huge
    'model = "x"\nport = 99999999999999999999\n',         # TOML int overflow
    'model = "\u202e\U0001f600"\nserved_model_name = "名前"\n',  # unicode is fine
    "\x00\x01garbage",
])
def test_nasty_profiles_via_the_cli_never_traceback(mm_env, text):
    d = Path(mm_env["MM_HOME"]) / "config" / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    (d / "fuzz.toml").write_text(text)
    r = subprocess.run([sys.executable, "-m", "mmlib", "profiles", "show", "fuzz"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr + r.stdout
    assert r.returncode in (0, 1)


def test_deep_extends_chain_is_refused(mm_env):
    d = Path(mm_env["MM_HOME"]) / "config" / "profiles"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(20):
        (d / f"p{i}.toml").write_text(f'extends = "p{i + 1}"\n' if i < 19 else 'model = "x"\n')
    with pytest.raises(ProfileError, match="deeper"):
        load_profile("p0")


@pytest.fixture(scope="module")
def target_up(shared_fake_mm):
    """One daemon serving "target" for the malformed calls below: each is refused, none changes it."""
    shared_fake_mm.add_profile("target")
    shared_fake_mm.mm("up", "target", "--force")
    return shared_fake_mm


@pytest.mark.parametrize("body, ctype, status", [
    (b"{not json", "application/json", 400),
    (b"[1, 2]", "application/json", 400),
    (b'{"model": 42}', "application/json", 400),
    (b"\xff\xfe\x00", "application/json", 400),
    (b'{"model": "../../etc/passwd", "messages": []}', "application/json", 404),
    (b'{"model": "/etc/passwd", "messages": []}', "application/json", 404),
])
def test_malformed_requests_to_the_proxy_get_4xx(target_up, body, ctype, status):
    r = httpx.post(f"{target_up.proxy}/v1/chat/completions", content=body, headers={"content-type": ctype})
    assert r.status_code == status
    assert "error" in r.json()


@pytest.mark.parametrize("path, body, status", [
    ("/up", b"{not json", 400),
    ("/up", b"[]", 400),
    ("/up", b'{"profile": 7}', 400),
    ("/up", b'{"profile": "../../etc/passwd"}', 409),
    ("/stop", b'{"profile": "never-started"}', 409),
    ("/nope", b"{}", 404),
])
def test_malformed_control_calls_get_4xx(target_up, path, body, status):
    sock = str(Path(target_up.env["MM_HOME"]) / "state" / "mm.sock")
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://mm") as control:
        r = control.post(path, content=body)
    assert r.status_code == status


def test_garbage_bytes_on_the_proxy_port_do_not_hurt_it(target_up):
    import socket

    port = int(target_up.env["MM_PROXY_PORT"])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        s.settimeout(5)
        reply = s.recv(100)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{target_up.proxy}/health").status_code == 200
