"""mm's own settings (not a model's): config.toml in the user's config dir, overridable by env."""
from __future__ import annotations

import os
from dataclasses import dataclass

from mmlib import paths
from mmlib.errors import ProfileError

# The CLI's control client reads api_key here on every command (`mm status` among them), so the
# profile machinery is imported only where a config file is actually read.

# key -> (type, what to tell the user)
KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "proxy_host": (str, "an address such as 127.0.0.1"),
    "proxy_port": (int, "a port number"),
    "api_key": (str, "a string"),
    "default_profile": (str, "a profile name"),
    "upstream_timeout": ((int, float), "seconds a model may stay silent mid-request, e.g. 600"),
    "max_body_mib": ((int, float), "MiB, the largest request body the endpoint takes, e.g. 100"),
    "gpu_budget": ((str, int), 'a size such as "12GiB": the GPU memory mm may use (default: the whole card)'),
    "ram_budget": ((str, int), 'a size such as "24GiB": the RAM mm\'s servers may hold, awake and asleep '
                   "(default: 80% of the machine's RAM less what other programs hold)"),
    "switch_max_wait": ((int, float), "seconds a request waits for its model while another serves, e.g. 1"),
    "switch_pause_in_flight": (bool, "true (a switch pauses an answer still running after switch_pause_after; "
                               "it goes on when its model is back) or false (a switch waits for it to finish)"),
    "switch_pause_after": ((int, float), "seconds the answers in flight may hold a switch up before they pause, e.g. 5"),
    "checkpoint_sleepers": (bool, "true (where the CUDA driver can, a sleeper that must make room is checkpointed "
                            "off the card instead of stopped) or false (sleepers keep their residue on the card)"),
}
ENV = {"proxy_host": "MM_PROXY_HOST", "proxy_port": "MM_PROXY_PORT", "api_key": "MM_API_KEY",
       "default_profile": "MM_DEFAULT_PROFILE", "gpu_budget": "MM_GPU_BUDGET"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Config:
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8000
    api_key: str | None = None
    default_profile: str = "default"
    upstream_timeout: float = 600.0
    max_body_mib: float = 100.0
    # GPU memory mm may use, bytes: a desktop's share of the card, or an emulated smaller card.
    # None: the whole card, as NVML reports it.
    gpu_budget: int | None = None
    # RAM mm's servers may hold together, awake and asleep (sleepers: the weights a sleep moved off the
    # card, checkpoints), bytes; None: derived (the scheduler's derived_ram_budget).
    ram_budget: int | None = None
    switch_max_wait: float = 1.0
    switch_pause_in_flight: bool = True
    switch_pause_after: float = 5.0
    checkpoint_sleepers: bool = True

    @property
    def proxy_url(self) -> str:
        host = "127.0.0.1" if self.proxy_host in ("0.0.0.0", "", "::") else self.proxy_host
        return f"http://{host}:{self.proxy_port}"


def config_path():
    return paths.config_dir() / "config.toml"


def _budget(where: str, value: str | int, key: str = "gpu_budget") -> int:
    from mmlib.profiles.memory import gib, parse_size

    try:
        n = value if isinstance(value, int) else parse_size(value)
    except ValueError:
        n = 0
    what = "a GPU memory budget" if key == "gpu_budget" else "a RAM budget"
    if n < 256 << 20:
        raise ProfileError(where, f"{value!r} is not {what}", 'write it like "12GiB" (bytes as a number '
                           f"also work; at least {gib(256 << 20)})", key=key)
    return n


def load_config() -> Config:
    path = config_path()
    data = {}
    if path.is_file():
        from mmlib.profiles.profile import read_toml

        data = read_toml(path)
    for key, value in data.items():
        if key not in KEYS:
            raise ProfileError(str(path), "unknown key", f"known keys: {', '.join(KEYS)}", key=key)
        kind, what = KEYS[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ProfileError(str(path), f"expected {what}, got {value!r}"[:200], f"set {key} to {what}", key=key)
    for key, var in ENV.items():
        value = os.environ.get(var)
        if value:
            try:
                data[key] = int(value) if KEYS[key][0] is int else value
            except ValueError:
                raise ProfileError(var, f"{value!r} is not a whole number", f"set {var} to a port number") from None
    if "gpu_budget" in data:
        where = ENV["gpu_budget"] if os.environ.get(ENV["gpu_budget"]) else str(path)
        data["gpu_budget"] = _budget(where, data["gpu_budget"])
    if "ram_budget" in data:
        data["ram_budget"] = _budget(str(path), data["ram_budget"], "ram_budget")
    for key in ("upstream_timeout", "max_body_mib", "switch_max_wait", "switch_pause_after"):
        if key in data and not data[key] > 0:
            raise ProfileError(str(path), f"{data[key]!r} is not above 0", f"set {key} to {KEYS[key][1]}", key=key)
    config = Config(**data)
    if config.proxy_host not in LOOPBACK and not config.api_key:
        raise ProfileError(str(path), f"proxy_host = {config.proxy_host!r} would let anyone on the network "
                           "use your models", "set api_key in config.toml (or MM_API_KEY) as well", key="proxy_host")
    return config


def client_api_key() -> str | None:
    """The key the CLI sends to the daemon and the endpoint: MM_API_KEY, else config.toml's api_key."""
    if os.environ.get("MM_API_KEY"):
        return os.environ["MM_API_KEY"]
    try:
        return load_config().api_key
    except ProfileError:
        return None


def checkpoint_sleepers() -> bool:
    """config.toml's checkpoint_sleepers for `mm check` and `mm doctor` (true where config.toml cannot
    be read: the commands that need it say why)."""
    try:
        return load_config().checkpoint_sleepers
    except ProfileError:
        return True
