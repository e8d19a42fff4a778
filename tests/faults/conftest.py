"""A real mm daemon whose vLLM is the fake one (tests/faults/fakevllm): sleep mode and faults."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import LiveMM, free_port, runtime_dir

FAKE_VLLM = Path(__file__).resolve().parent / "fakevllm"

FAKE_PROFILE = """
model = "fake/{name}"
served_model_name = "{name}"
startup_timeout = {startup_timeout}
{extra}
[sleep]
enabled = {sleep}
"""


def fake_model(env: dict, model: str, config: str = "{}") -> None:
    """`model` in the hub cache (config.json, empty unless given, and an empty weight file): mm refuses to start a
    hub model that is not on disk while HF_HUB_OFFLINE is set, and the fake loads nothing anyway."""
    snapshot = Path(env["HF_HUB_CACHE"]) / f"models--{model.replace('/', '--')}" / "snapshots" / "fake"
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text(config)
    (snapshot / "model.safetensors").touch()


class FakeMM(LiveMM):
    def add_profile(self, name: str, sleep: bool = True, extra: str = "", startup_timeout: float = 30) -> None:
        d = Path(self.env["MM_HOME"]) / "config" / "profiles"
        d.mkdir(parents=True, exist_ok=True)
        fake_model(self.env, f"fake/{name}")
        (d / f"{name}.toml").write_text(FAKE_PROFILE.format(name=name, sleep=str(sleep).lower(), extra=extra,
                                                                       startup_timeout=startup_timeout))

    def server(self, profile: str) -> dict:
        return {s["profile"]: s for s in self.status()["servers"]}[profile]

    def calls(self, profile: str) -> list[str]:
        return [c["call"] for c in self.direct(profile).get("/calls").json()]


def started_fake_mm(base: Path):
    """A FakeMM under base (its daemon starts with its first command); stops it at the end."""
    env = {"MM_HOME": str(base / "home"), "MM_PROXY_PORT": str(free_port()), "MM_RUNTIME_DIR": runtime_dir(),
           "MM_RESULTS_DIR": str(base / "results"),
           "HF_HUB_OFFLINE": "1",  # the fake models (fake/NAME) are on no hub: mm must not pull them first
           "HF_HUB_CACHE": str(base / "hf"),  # where add_profile puts them (fake_model)
           "PYTHONPATH": os.pathsep.join([str(FAKE_VLLM), str(Path(__file__).resolve().parents[2])])}
    fake = FakeMM(env)
    yield fake
    fake.mm("daemon", "stop", check=False)
    deadline = time.time() + 30
    while time.time() < deadline and (Path(env["MM_HOME"]) / "state" / "mm.sock").exists():
        time.sleep(0.1)


@pytest.fixture
def fake_mm(tmp_path):
    yield from started_fake_mm(tmp_path)


@pytest.fixture(scope="module")
def shared_fake_mm(tmp_path_factory):
    """One daemon for the tests of a module that leave it as they found it (requests it must refuse,
    reads): a daemon and a server less to start per test."""
    yield from started_fake_mm(tmp_path_factory.mktemp("fake"))
