"""guard/preflight: the daemon's checks before a start (a refusal is one line, kept per profile value,
run off the event loop) and what each model serves (a request at the wrong endpoint is named)."""
from __future__ import annotations

import asyncio
import threading
from types import MappingProxyType

import pytest

from mmlib.errors import Refused
from mmlib.guard import checks, preflight
from mmlib.guard.preflight import CHAT, EMBEDDINGS, PAGES, SPEECH, Preflight, misdirected, serves
from mmlib.guard.rules import Facts
from mmlib.profiles.profile import Profile
from tests.unit.test_checks import SPEC


def profile(engine: dict | None = None, model: str = "org/model", name: str = "p") -> Profile:
    return Profile(name=name, source=f"/profiles/{name}.toml", model=model, served_model_name=name,
                   engine=MappingProxyType(engine or {}))


async def spec():
    return SPEC


class Files:
    """checks.model_files stubbed: no disk, no hub; counts its calls and, with `block`, holds them."""

    def __init__(self):
        self.calls: list[str] = []
        self.block: threading.Event | None = None

    def __call__(self, p: Profile, remote: bool = True):
        self.calls.append(p.name)
        if self.block is not None:
            self.block.wait(10)
        return None, None, "stubbed"


@pytest.fixture(autouse=True)
def files(monkeypatch) -> Files:
    stub = Files()
    monkeypatch.setattr(checks, "model_files", stub)
    monkeypatch.setattr(preflight, "on_disk", lambda p: True)
    return stub


def made() -> Preflight:
    return Preflight(spec, card=lambda: None, facts=lambda ports: Facts())


def test_a_misspelt_engine_key_is_refused_with_the_checks_one_line():
    pf = made()
    with pytest.raises(Refused) as e:
        asyncio.run(pf(profile({"kv_ofloading_backend": "native"})))
    text = str(e.value)
    assert e.value.status == 400 and "\n" not in text
    assert text.startswith("/profiles/p.toml: engine.kv_ofloading_backend: vLLM 0.32.0 has no --kv-ofloading-backend")


def test_several_errors_are_still_one_line_naming_mm_check():
    pf = made()
    with pytest.raises(Refused) as e:
        asyncio.run(pf(profile({"max_modle_len": 8192, "kv_cache_dtype": "fp9"})))
    assert "\n" not in str(e.value) and str(e.value).endswith("(and 1 more: `mm check p`)")


def test_a_verdict_is_kept_until_the_profile_changes(files):
    pf = made()

    async def go():
        for _ in range(3):
            await pf(profile({"max_num_seqs": 8}))
        await pf(profile({"max_num_seqs": 16}))  # edited: checked again
    asyncio.run(go())
    assert files.calls == ["p", "p"]


def test_a_forced_profile_starts_whatever_the_checks_say():
    pf = made()
    broken = profile({"no_such_flag": 1})
    pf.force(broken)
    asyncio.run(pf(broken))
    assert pf.footprint(broken) is not None  # checked all the same, for its footprint
    with pytest.raises(Refused):
        asyncio.run(pf(profile({"no_such_flag": 2})))  # another value of it is checked


def test_the_checks_run_off_the_event_loop(files):
    """A model's metadata may come from a hub that hangs: the loop serves others meanwhile."""
    block = files.block = threading.Event()
    pf = made()

    async def go():
        checking = asyncio.ensure_future(pf(profile()))
        for _ in range(50):  # the loop turns while the check is stuck in its thread
            await asyncio.sleep(0)
        assert not checking.done()
        block.set()
        await checking
    asyncio.run(go())


def test_the_footprint_is_read_from_the_checks_never_computed():
    pf = made()
    p = profile()
    assert pf.footprint(p) is None  # not checked yet: nothing computed here
    asyncio.run(pf(p))
    assert pf.footprint(p) is not None
    assert pf.footprint(profile({"max_num_seqs": 4})) is None  # another value of the profile


def test_a_model_missing_offline_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    p = profile(model="org/not-here")
    f = checks.model_missing(p)
    assert f is not None and f.key == "model" and "not on this machine and HF_HUB_OFFLINE is set" in f.message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert checks.model_missing(p) is None  # online: mm up pulls it first


# --- what a model serves ----------------------------------------------------------------------------------
@pytest.mark.parametrize("engine,config,model,expected", [
    ({}, {"architectures": ["WhisperForConditionalGeneration"]}, "x/y", SPEECH),
    ({}, None, "openai/whisper-large-v3-turbo", SPEECH),
    ({}, {"architectures": ["LightOnOCRForConditionalGeneration"]}, "x/y", PAGES),
    ({}, None, "lightonai/LightOnOCR-1B-1025", PAGES),
    ({"runner": "pooling"}, {"architectures": ["Qwen2ForCausalLM"]}, "x/y", EMBEDDINGS),
    ({}, {"architectures": ["Qwen2ForCausalLM"]}, "openai/whisper-lookalike", CHAT),  # config.json wins
    ({}, None, "Qwen/Qwen2.5-7B-Instruct-AWQ", CHAT),
])
def test_what_a_model_serves(engine, config, model, expected):
    assert serves(profile(engine, model), config) == expected


def test_requests_at_the_wrong_endpoint_name_the_right_one():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with_image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "read"}, {"type": "image_url", "image_url": {"url": "data:..."}}]}]}
    assert "/v1/audio/transcriptions" in misdirected(SPEECH, "whisper", "/v1/chat/completions", chat)
    assert misdirected(SPEECH, "whisper", "/v1/audio/transcriptions", None) is None
    assert "/v1/embeddings" in misdirected(EMBEDDINGS, "e5", "/v1/completions", {"prompt": "x"})
    assert "does not transcribe speech" in misdirected(CHAT, "qwen", "/v1/audio/transcriptions", None)
    assert "does not answer /v1/embeddings" in misdirected(CHAT, "qwen", "/v1/embeddings", {"input": "x"})
    assert "image_url" in misdirected(PAGES, "ocr", "/v1/chat/completions", chat)
    assert misdirected(PAGES, "ocr", "/v1/chat/completions", with_image) is None
    assert misdirected(CHAT, "qwen", "/v1/chat/completions", chat) is None
    assert misdirected(CHAT, "qwen", "/v1/chat/completions", {"messages": "junk"}) is None
