"""mm's own settings (not a model's): config.toml in the user's config dir, overridable by env."""
from __future__ import annotations

import os
from dataclasses import dataclass

from mmlib import paths
from mmlib.errors import ProfileError
from mmlib.profiles.profile import read_toml

KEYS = {"proxy_host": str, "proxy_port": int, "api_key": str, "default_profile": str}


@dataclass(frozen=True)
class Config:
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8000
    api_key: str | None = None
    default_profile: str = "default"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.proxy_host}:{self.proxy_port}"


def load_config() -> Config:
    path = paths.config_dir() / "config.toml"
    data = read_toml(path) if path.is_file() else {}
    for key, value in data.items():
        if key not in KEYS:
            raise ProfileError(str(path), "unknown key", f"known keys: {', '.join(KEYS)}", key=key)
        if not isinstance(value, KEYS[key]) or isinstance(value, bool):
            raise ProfileError(str(path), f"expected {KEYS[key].__name__}", key=key)
    env = {"proxy_host": os.environ.get("MM_PROXY_HOST"), "proxy_port": os.environ.get("MM_PROXY_PORT"),
           "api_key": os.environ.get("MM_API_KEY"), "default_profile": os.environ.get("MM_DEFAULT_PROFILE")}
    for key, value in env.items():
        if value:
            data[key] = int(value) if KEYS[key] is int else value
    return Config(**data)
