"""mm's own settings (not a model's): config.toml in the user's config dir, overridable by env."""
from __future__ import annotations

import os
from dataclasses import dataclass

from mmlib import paths
from mmlib.errors import ProfileError
from mmlib.profiles.memory import gib, parse_size
from mmlib.profiles.profile import read_toml

KEYS = {"proxy_host": str, "proxy_port": int, "api_key": str, "default_profile": str, "gpu_budget": (str, int)}
ENV = {"proxy_host": "MM_PROXY_HOST", "proxy_port": "MM_PROXY_PORT", "api_key": "MM_API_KEY",
       "default_profile": "MM_DEFAULT_PROFILE", "gpu_budget": "MM_GPU_BUDGET"}


@dataclass(frozen=True)
class Config:
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8000
    api_key: str | None = None
    default_profile: str = "default"
    # GPU memory mm may use, bytes: a desktop's share of the card, or an emulated smaller card.
    # None: the whole card, as NVML reports it.
    gpu_budget: int | None = None

    @property
    def proxy_url(self) -> str:
        return f"http://{self.proxy_host}:{self.proxy_port}"


def _budget(where: str, value: str | int) -> int:
    try:
        n = value if isinstance(value, int) else parse_size(value)
    except ValueError:
        n = 0
    if n < 256 << 20:
        raise ProfileError(where, f"{value!r} is not a GPU memory budget", 'write it like "12GiB" (bytes as a number '
                           f"also work; at least {gib(256 << 20)})", key="gpu_budget")
    return n


def load_config() -> Config:
    path = paths.config_dir() / "config.toml"
    data = read_toml(path) if path.is_file() else {}
    for key, value in data.items():
        if key not in KEYS:
            raise ProfileError(str(path), "unknown key", f"known keys: {', '.join(KEYS)}", key=key)
        types = KEYS[key] if isinstance(KEYS[key], tuple) else (KEYS[key],)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProfileError(str(path), f"expected {' or '.join(t.__name__ for t in types)}", key=key)
    for key, name in ENV.items():
        value = os.environ.get(name)
        if value:
            data[key] = int(value) if KEYS[key] is int else value
    if "gpu_budget" in data:
        where = ENV["gpu_budget"] if os.environ.get(ENV["gpu_budget"]) else str(path)
        data["gpu_budget"] = _budget(where, data["gpu_budget"])
    return Config(**data)
