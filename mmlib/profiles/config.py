"""mm's own settings (not a model's): config.toml in the user's config dir, overridable by env."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mmlib import paths
from mmlib.errors import ProfileError
from mmlib.profiles.profile import read_toml

# key -> (type, what to tell the user)
KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "proxy_host": (str, "an address such as 127.0.0.1"),
    "proxy_port": (int, "a port number"),
    "api_key": (str, "a string"),
    "default_profile": (str, "a profile name"),
    "upstream_timeout": ((int, float), "seconds a model may stay silent mid-request, e.g. 600"),
    "max_body_mib": ((int, float), "MiB, the largest request body the endpoint takes, e.g. 100"),
    "gpu_budget": (str, 'GPU memory mm may use, e.g. "12GiB" (default: the whole card)'),
    "switch_max_wait": ((int, float), "seconds a request waits for its model while another serves, e.g. 1"),
}
ENV = {"proxy_host": "MM_PROXY_HOST", "proxy_port": "MM_PROXY_PORT", "api_key": "MM_API_KEY",
       "default_profile": "MM_DEFAULT_PROFILE"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Config:
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8000
    api_key: str | None = None
    default_profile: str = "default"
    upstream_timeout: float = 600.0
    max_body_mib: float = 100.0
    gpu_budget: str | None = None
    switch_max_wait: float = 1.0

    @property
    def gpu_budget_bytes(self) -> int | None:
        return parse_size(self.gpu_budget) if self.gpu_budget else None

    @property
    def proxy_url(self) -> str:
        host = "127.0.0.1" if self.proxy_host in ("0.0.0.0", "", "::") else self.proxy_host
        return f"http://{host}:{self.proxy_port}"


def config_path():
    return paths.config_dir() / "config.toml"


def load_config() -> Config:
    path = config_path()
    data = read_toml(path) if path.is_file() else {}
    for key, value in data.items():
        if key not in KEYS:
            raise ProfileError(str(path), "unknown key", f"known keys: {', '.join(KEYS)}", key=key)
        kind, what = KEYS[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProfileError(str(path), f"expected {what}, got {value!r}"[:200], f"set {key} to {what}", key=key)
    for key, var in ENV.items():
        value = os.environ.get(var)
        if value:
            try:
                data[key] = int(value) if KEYS[key][0] is int else value
            except ValueError:
                raise ProfileError(var, f"{value!r} is not a whole number", f"set {var} to a port number") from None
    if "gpu_budget" in data:
        try:
            parse_size(data["gpu_budget"])
        except ValueError as e:
            raise ProfileError(str(path), str(e), 'write it like "12GiB"', key="gpu_budget") from None
    for key in ("upstream_timeout", "max_body_mib", "switch_max_wait"):
        if key in data and not data[key] > 0:
            raise ProfileError(str(path), f"{data[key]!r} is not above 0", f"set {key} to {KEYS[key][1]}", key=key)
    config = Config(**data)
    if config.proxy_host not in LOOPBACK and not config.api_key:
        raise ProfileError(str(path), f"proxy_host = {config.proxy_host!r} would let anyone on the network "
                           "use your models", "set api_key in config.toml (or MM_API_KEY) as well", key="proxy_host")
    return config


def parse_size(text: str) -> int:
    """"12GiB", "12G", "12GB", "11000MiB", "12" (GiB) -> bytes. Binary throughout: a "12 GB" card
    has 12 GiB, as card makers mean it."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (write it like 12GiB or 11000MiB)")
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 3
    return int(float(m.group(1)) * (1 << (10 * power)))


def client_api_key() -> str | None:
    """The key the CLI sends to the daemon and the endpoint: MM_API_KEY, else config.toml's api_key."""
    if os.environ.get("MM_API_KEY"):
        return os.environ["MM_API_KEY"]
    try:
        return load_config().api_key
    except ProfileError:
        return None
