"""Profiles: TOML files that say what to serve and how. Load, merge `extends`, validate -> Profile.

Shipped profiles live in ./profiles; the user's own (XDG config dir, profiles/) are read after them,
so a user's file of the same name wins. Every problem is a ProfileError naming the file and key.

One name means one profile: a served name or alias belongs to the file that sets it (`extends` does
not pass them on; a profile that extends another without its own served_model_name is served under
its profile name), and a name claimed twice is an error for the file read later (load_all).
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI (a dependency on 3.10 only)
    import tomli as tomllib

from mmlib import paths
from mmlib.errors import ProfileError
from mmlib.profiles.memory import MemorySpec, parse_memory

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_EXTENDS_DEPTH = 8
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
RESTART_POLICIES = ("no", "on-failure")
DEFAULT_SHARE = 0.9  # vLLM's own gpu_memory_utilization where a profile sets none
# Names a client sends: each belongs to the one file that sets it, so `extends` does not inherit them.
OWN_NAME_KEYS = ("served_model_name", "aliases")
# [engine] keys mm sets itself (a second value would fight the supervisor), and what to write instead.
RESERVED_ENGINE_KEYS = {
    "host": "set the top-level `host` instead", "port": "set the top-level `port` instead",
    "model": "set the top-level `model` instead", "served_model_name": "set the top-level `served_model_name` instead",
    "api_key": "set the top-level `api_key` instead (mm passes it by environment, never on the command line)",
    "uds": "remove it: mm puts each server on a unix socket of its own unless the profile sets `port`",
    "tensor_parallel_size": 'set gpus = N and parallel = "tensor" instead (mm gives the server its cards)',
    "data_parallel_size": 'set gpus = N and parallel = "data" instead (mm gives the server its cards)',
}
# More than one card: how the model is laid out over them.
PARALLEL_LAYOUTS = {"data": "a replica of the whole model on each card, behind the server's one endpoint",
                    "tensor": "the model split over the cards, one copy in all"}
MAX_GPUS = 64
# [env] variables that choose cards: mm sets them from `gpus`, so that its memory accounting is right.
CARD_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
# vLLM's data parallelism and its sleep mode are not reliable together (vllm-project/vllm#51476: a
# sleep's drain could only time out until #51481, a DP pause runs forwards it does not wait for, and
# #44483 fixed an illegal memory access on a wake): mm refuses the pair rather than hang a switch.
DATA_PARALLEL_SLEEP = ("vLLM's data parallelism and sleep mode are not reliable together (vllm-project/vllm#51476: "
                       "a sleep's drain can hang and a wake can crash)")


@dataclass(frozen=True)
class SleepSettings:
    enabled: bool = False
    level: int = 1
    # Where the CUDA driver can: a sleeper that must make room is checkpointed off the card (its GPU
    # state moved to RAM) instead of stopped.
    checkpoint: bool = True


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    description: str = ""
    model: str | None = None
    served_model_name: str = ""
    aliases: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int | None = None
    startup_timeout: float = 900.0
    engine: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    sleep: SleepSettings = SleepSettings()
    idle_sleep: float | None = None
    idle_stop: float | None = None
    restart: str = "on-failure"
    max_restarts: int = 3
    api_key: str | None = None
    stack: tuple[str, ...] = ()
    # Declares engine.gpu_memory_utilization a budget this server keeps to, so it may stay awake
    # beside other such servers while the shares add up to at most 1. Otherwise it runs alone.
    share_gpu: bool = False
    # What the server needs in tokens or bytes ([memory]); None: vLLM sizes it from a share.
    memory: MemorySpec | None = None
    # The profile's own model when `with_model` put another in its place (mm then fits the
    # memory plan to the new model's shapes).
    base_model: str | None = None
    # The cards the server runs on: how many, and which where the profile names them (NVML's
    # indices, as `nvidia-smi` and `mm status` print them; none named: mm picks the least used).
    # More than one needs a layout, `parallel`: "data" or "tensor" (PARALLEL_LAYOUTS).
    gpus: int = 1
    gpu_indices: tuple[int, ...] = ()
    parallel: str = ""

    @property
    def is_stack(self) -> bool:
        return bool(self.stack)

    @property
    def sizing(self) -> str:
        """A digest of the settings that size its server's memory (engine, memory, sleep level,
        cards): a footprint measured under other settings stands for them, not for these (a stale
        awake peak made the scheduler evict sleepers after "fill" changed)."""
        import hashlib
        import json

        settings = {"engine": dict(self.engine), "memory": self.memory.to_table() if self.memory else None,
                    "sleep": self.sleep.level if self.sleep.enabled else None,
                    "cards": [self.gpus, list(self.gpu_indices), self.parallel]}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def names(self) -> tuple[str, ...]:
        """Every model name a client may use for this profile."""
        return (self.served_model_name, *self.aliases) if self.served_model_name else ()

    @property
    def max_num_seqs(self) -> int | None:
        """Requests at once, where the profile says: [memory] sequences, else engine.max_num_seqs."""
        if self.memory and self.memory.sequences:
            return self.memory.sequences
        n = self.engine.get("max_num_seqs")
        return n if isinstance(n, int) and not isinstance(n, bool) else None

    @property
    def tensor_parallel(self) -> int:
        """Cards the model is split over (1: whole on each of its cards)."""
        return self.gpus if self.parallel == "tensor" else 1

    @property
    def data_parallel(self) -> int:
        """Replicas of the model, one a card."""
        return self.gpus if self.parallel == "data" else 1

    @property
    def memory_share(self) -> float:
        return float(self.engine.get("gpu_memory_utilization", DEFAULT_SHARE))

    def with_model(self, model: str) -> "Profile":
        return dataclasses.replace(self, model=model, served_model_name=default_served_name(model), aliases=(),
                                   base_model=self.base_model or self.model)

    @property
    def model_replaced(self) -> bool:
        return self.base_model is not None and self.base_model != self.model


# key -> (accepted python types, what to tell the user). Tables are checked on their own.
SCALAR_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "description": ((str,), "a string"),
    "extends": ((str,), "a profile name"),
    "model": ((str,), "a hub id such as Qwen/Qwen2.5-7B-Instruct-AWQ, or a local path"),
    "served_model_name": ((str,), "a string"),
    "aliases": ((list,), "a list of strings"),
    "host": ((str,), "an address such as 127.0.0.1"),
    "port": ((int,), "an integer 1-65535 (leave it out to pick a free one)"),
    "startup_timeout": ((int, float), "seconds, a number > 0"),
    "idle_sleep": ((int, float), "seconds, a number > 0"),
    "idle_stop": ((int, float), "seconds, a number > 0"),
    "restart": ((str,), '"no" or "on-failure"'),
    "max_restarts": ((int,), "an integer >= 0"),
    "api_key": ((str,), "a string"),
    "stack": ((list,), "a list of profile names"),
    "share_gpu": ((bool,), "true or false"),
    "gpus": ((int, list), "a number of cards such as 2, or a list of card indices such as [0, 1]"),
    "parallel": ((str,), '"data" or "tensor"'),
}
TABLE_KEYS = ("engine", "env", "sleep", "memory")
SLEEP_KEYS = {"enabled": (bool,), "level": (int,), "checkpoint": (bool,)}


def is_secret(name: str) -> bool:
    """A variable that holds a secret by its name (HF_TOKEN, OPENAI_API_KEY, ...)."""
    return any(word in name.upper() for word in SECRET_WORDS)


def masked_env(env: Mapping[str, str]) -> dict[str, str]:
    """For display and results: secret-looking variables (api keys, HF_TOKEN) shown as ***."""
    return {k: ("***" if is_secret(k) and v else v) for k, v in env.items()}


def default_served_name(model: str) -> str:
    return model.rstrip("/").split("/")[-1].split(":")[-1]


def profile_dirs() -> list[Path]:
    """Search order: the user's directory first, so their files shadow shipped ones."""
    return [paths.user_profiles_dir(), paths.SHIPPED_PROFILES]


def profile_path(name: str) -> Path:
    if not NAME_RE.match(name):
        raise ProfileError(name, "not a profile name", "use letters, digits, '.', '_' and '-' only")
    for d in profile_dirs():
        p = d / f"{name}.toml"
        if p.is_file():
            return p
    known = list_profile_names()
    hint = difflib.get_close_matches(name, known, n=1)
    fix = f"did you mean '{hint[0]}'?" if hint else f"known profiles: {', '.join(known) or 'none'}"
    raise ProfileError(f"profile '{name}'", "no such profile", fix)


def list_profile_names() -> list[str]:
    names: set[str] = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml") if NAME_RE.match(p.stem))
    return sorted(names)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(str(path), f"invalid TOML: {e}", "correct the syntax at that line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(str(path), f"cannot read: {e}") from None


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, anything else in `over` replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(name: str, chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """The profile's table with its `extends` chain merged in, and the files it came from."""
    if name in chain:
        raise ProfileError(str(profile_path(chain[0])), f"extends cycle: {' -> '.join(chain + (name,))}",
                           "make one profile in the chain stop extending")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise ProfileError(str(profile_path(chain[0])), f"extends chain deeper than {MAX_EXTENDS_DEPTH}",
                           "flatten the chain")
    path = profile_path(name)
    data = read_toml(path)
    if isinstance(data.get("engine"), dict):  # per file, so a child's spelling replaces its parent's
        data["engine"] = normalise_engine(str(path), data["engine"])
    parent = data.get("extends")
    if parent is None:
        return data, [str(path)]
    if not isinstance(parent, str) or not NAME_RE.match(parent):
        raise ProfileError(str(path), f"{parent!r} is not a profile name", key="extends")
    try:
        profile_path(parent)
    except ProfileError as e:
        raise ProfileError(str(path), f"no profile named {parent!r}", e.fix, key="extends") from None
    base, files = load_raw(parent, chain + (name,))
    merged = merge({k: v for k, v in base.items() if k not in OWN_NAME_KEYS}, data)
    merged.pop("extends", None)
    if merged.get("model"):  # a stack has no served name
        merged.setdefault("served_model_name", name)
    return merged, files + [str(path)]


def load_profile(name: str) -> Profile:
    data, files = load_raw(name)
    return validate(name, data, files[-1])


def reading_order() -> list[str]:
    """Profile names as their files are read: shipped ones first, then the user's (a user's file of
    a shipped name counts as the user's), each group by name."""
    user = paths.user_profiles_dir()
    mine = {p.stem for p in user.glob("*.toml")} if user.is_dir() else set()
    names = list_profile_names()
    return [n for n in names if n not in mine] + [n for n in names if n in mine]


def load_all() -> tuple[list[Profile], list[ProfileError]]:
    """Every profile that loads, each client name served by one of them; errors for the rest,
    a name claimed twice among them (claim_names)."""
    profiles, errors, order = [], [], reading_order()
    for name in order:
        try:
            profiles.append(load_profile(name))
        except ProfileError as e:
            errors.append(e)
    served, clashes = claim_names(profiles, order)
    return sorted(served, key=lambda p: p.name), errors + clashes


def claim_names(profiles: list[Profile], all_names: list[str]) -> tuple[list[Profile], list[ProfileError]]:
    """One owner per name, in reading order. Profile names come first (`mm up NAME` and `mm chat
    NAME` always mean NAME.toml), then served names and aliases, first file first. A later claim
    is an error for its file: a taken alias is dropped from it; a taken served name keeps the whole
    profile out (vLLM would serve it under that name)."""
    owner: dict[str, tuple[str, str]] = {n: (f"the name of profile '{n}'", n) for n in all_names}
    where = {p.name: p.source for p in profiles}
    served, errors = [], []
    for p in profiles:
        aliases = []
        claims = [("served_model_name", p.served_model_name)] + [("aliases", a) for a in p.aliases] if p.names else []
        for key, n in claims:
            what, holder = owner.setdefault(n, (f"a name of profile '{p.name}'", p.name))
            if holder == p.name:
                aliases += [n] if key == "aliases" else []
                continue
            fix = ("set another served_model_name here" if key == "served_model_name"
                   else "remove the alias here, or rename one of the two")
            errors.append(ProfileError(p.source, f"'{n}' is already {what} "
                                       f"({where.get(holder) or profile_path(holder)}); one name reaches one profile",
                                       fix, key=key))
            if key == "served_model_name":
                break
        else:
            served.append(dataclasses.replace(p, aliases=tuple(aliases)) if len(aliases) < len(p.aliases) else p)
    return served, errors


def name_clashes(names: list[str]) -> list[ProfileError]:
    """The names claimed twice that are errors for these profiles' files (the later files)."""
    files = set()
    for name in names:
        try:
            files.add(profile_path(name).resolve())
        except ProfileError:
            continue
    return [e for e in load_all()[1] if e.key in OWN_NAME_KEYS and Path(e.file).resolve() in files]


def _check_type(file: str, key: str, value: Any, types: tuple[type, ...], what: str) -> None:
    # bool is an int in Python; a TOML `true` is never a valid number here.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ProfileError(file, f"expected {what}, got {value!r}"[:200], f"set {key} to {what}", key=key)


def _check_unknown(file: str, keys: Any, known: Any, prefix: str = "") -> None:
    for key in keys:
        if key not in known:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            fix = f"did you mean '{prefix}{hint[0]}'?" if hint else f"known keys: {', '.join(known)}"
            raise ProfileError(file, "unknown key", fix, key=f"{prefix}{key}")


def _positive(file: str, key: str, value: float | None, upper: float = 10 * 365 * 86400) -> None:
    if value is not None and not 0 < value <= upper:
        raise ProfileError(file, f"{value!r} is out of range", f"set {key} to a number of seconds > 0", key=key)


def _strings(file: str, key: str, value: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(v, str) and v for v in value):
        raise ProfileError(file, "expected a list of non-empty strings", key=key)
    return tuple(value)


def normalise_engine(file: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """[engine] with every key in snake_case: vLLM reads max-model-len and max_model_len as one flag.
    Keys mm sets itself are refused here, in the spelling the file used."""
    out: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    for key, value in table.items():
        snake = key.replace("-", "_")
        if snake in RESERVED_ENGINE_KEYS:
            raise ProfileError(file, f"mm sets --{snake.replace('_', '-')} itself", RESERVED_ENGINE_KEYS[snake],
                               key=f"engine.{key}")
        if snake in spelt:
            raise ProfileError(file, f"set twice, as engine.{spelt[snake]} and engine.{key}",
                               f"keep one of them (engine.{snake})", key=f"engine.{key}")
        spelt[snake], out[snake] = key, value
    return out


def _engine(file: str, table: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in table.items():
        if not re.match(r"^[a-z][a-z0-9_-]*$", key):
            raise ProfileError(file, "not a vLLM argument name", "use snake_case, e.g. max_model_len",
                               key=f"engine.{key}")
        if isinstance(value, list) and not all(isinstance(v, (str, int, float)) for v in value):
            raise ProfileError(file, "lists may hold strings and numbers only", key=f"engine.{key}")
    return normalise_engine(file, table)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_listen(file: str, host: str, sleep: SleepSettings, env: Mapping[str, str], api_key: str | None) -> None:
    """Beyond this machine only behind a key, and never with vLLM's dev endpoints: sleep mode needs
    VLLM_SERVER_DEV_MODE, which opens /sleep, /wake_up and /collective_rpc to whoever reaches the
    port, and vLLM's api_key guards /v1 only."""
    if is_loopback(host):
        return
    if sleep.enabled:
        raise ProfileError(file, f"sleep mode on {host} would let anyone who reaches it call vLLM's /sleep, /wake_up "
                           "and /collective_rpc (its api_key guards /v1 only)",
                           'set host = "127.0.0.1" (other machines can use mm\'s proxy), or set sleep = false',
                           key="host")
    if env.get("VLLM_SERVER_DEV_MODE", "0") not in ("", "0"):
        raise ProfileError(file, f"opens vLLM's /sleep, /wake_up and /collective_rpc on {host} with no key",
                           'remove it, or set host = "127.0.0.1"', key="env.VLLM_SERVER_DEV_MODE")
    if not api_key:
        raise ProfileError(file, f"host = {host!r} lets other machines use this server with no key",
                           'set api_key = "<a secret>" (clients send it as a Bearer token), or host = "127.0.0.1"',
                           key="api_key")


def _env(file: str, table: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in table.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ProfileError(file, "not an environment variable name", key=f"env.{key}")
        if key in CARD_ENV:
            raise ProfileError(file, "mm chooses the server's cards itself (and counts their memory)",
                               "set gpus = [1] (the cards' indices, as `mm status` shows them) instead", key=f"env.{key}")
        if isinstance(value, bool):
            value = "1" if value else "0"
        if not isinstance(value, (str, int, float)):
            raise ProfileError(file, f"expected a string, got {type(value).__name__}", key=f"env.{key}")
        out[key] = str(value)
    return out


def _sleep(file: str, table: Any) -> SleepSettings:
    if isinstance(table, bool):  # `sleep = true` is short for `[sleep] enabled = true`
        return SleepSettings(enabled=table)
    _check_unknown(file, table, SLEEP_KEYS, "sleep.")
    for key, types in SLEEP_KEYS.items():
        if key in table:
            _check_type(file, f"sleep.{key}", table[key], types, types[0].__name__)
    level = table.get("level", 1)
    if level not in (1, 2):
        raise ProfileError(file, f"level {level} is not 1 or 2", "level 1 keeps weights in RAM, 2 drops them",
                           key="sleep.level")
    return SleepSettings(enabled=table.get("enabled", True), level=level, checkpoint=table.get("checkpoint", True))


def _gpus(file: str, value: Any) -> tuple[int, tuple[int, ...]]:
    """(how many cards, which: () where mm picks) from `gpus = 2` or `gpus = [0, 1]`."""
    if isinstance(value, int):
        if not 1 <= value <= MAX_GPUS:
            raise ProfileError(file, f"{value} is out of range", f"use 1-{MAX_GPUS} cards", key="gpus")
        return value, ()
    if not value or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_GPUS for i in value):
        raise ProfileError(file, f"expected card indices, got {value!r}"[:200],
                           "list cards as `mm status` numbers them, e.g. gpus = [0, 1]", key="gpus")
    if len(set(value)) != len(value):
        raise ProfileError(file, f"a card is listed twice in {value!r}", "list each card once", key="gpus")
    return len(value), tuple(value)


def _layout(file: str, data: Mapping[str, Any], sleep: SleepSettings) -> tuple[int, tuple[int, ...], str]:
    """`gpus` and `parallel`: how many cards, which, and how the model is laid out over them."""
    count, indices = _gpus(file, data.get("gpus", 1))
    parallel = data.get("parallel", "")
    if parallel and parallel not in PARALLEL_LAYOUTS:
        raise ProfileError(file, f"{parallel!r} is not a layout",
                           '"data" (a replica on each card) or "tensor" (the model split over the cards)',
                           key="parallel")
    if count > 1 and not parallel:
        raise ProfileError(file, f"{count} cards need a layout",
                           'set parallel = "data" (a replica of the model on each card, for throughput) or '
                           '"tensor" (the model split over the cards, for a model too big for one)', key="parallel")
    if count > 1 and parallel == "data" and sleep.enabled:
        raise ProfileError(file, DATA_PARALLEL_SLEEP,
                           'set sleep = false (mm stops and starts it instead of sleeping it), or parallel = "tensor"',
                           key="parallel")
    return count, indices, parallel if count > 1 else ""


def validate(name: str, data: Mapping[str, Any], file: str) -> Profile:
    _check_unknown(file, data, [*SCALAR_KEYS, *TABLE_KEYS])
    for key, value in data.items():
        if key in SCALAR_KEYS:
            _check_type(file, key, value, *SCALAR_KEYS[key])
        elif key != "sleep" and not isinstance(value, dict):
            raise ProfileError(file, f"expected a table [{key}]", f"write it as [{key}] with keys below", key=key)
    stack = _strings(file, "stack", data.get("stack", []))
    model = data.get("model")
    if not model and not stack:
        raise ProfileError(file, "missing", "set model = \"<hub id or local path>\" (or stack = [...])", key="model")
    port = data.get("port")
    if port is not None and not 1 <= port <= 65535:
        raise ProfileError(file, f"{port} is out of range", "use 1-65535, or leave port out", key="port")
    restart = data.get("restart", "on-failure")
    if restart not in RESTART_POLICIES:
        raise ProfileError(file, f"{restart!r} is not a restart policy", 'use "no" or "on-failure"', key="restart")
    max_restarts = data.get("max_restarts", 3)
    if not 0 <= max_restarts <= 100:
        raise ProfileError(file, f"{max_restarts} is out of range", "use 0-100", key="max_restarts")
    for key in ("startup_timeout", "idle_sleep", "idle_stop"):
        _positive(file, key, data.get(key))
    engine = _engine(file, data.get("engine", {}))
    memory = parse_memory(file, data["memory"], engine) if "memory" in data else None
    served = data.get("served_model_name") or (default_served_name(model) if model else "")
    aliases = _strings(file, "aliases", data.get("aliases", []))
    for key, n in [("served_model_name", served)] + [("aliases", a) for a in aliases]:
        if len(n) > 200 or not n.isprintable():  # clients send it back in JSON and headers
            raise ProfileError(file, f"bad model name {n!r}"[:200], "use a short printable name", key=key)
    aliases = tuple(a for a in dict.fromkeys(aliases) if a != served)  # one name, once
    host, env = data.get("host", "127.0.0.1"), _env(file, data.get("env", {}))
    sleep = _sleep(file, data.get("sleep", {"enabled": False}))
    _check_listen(file, host, sleep, env, data.get("api_key"))
    gpus, gpu_indices, parallel = _layout(file, data, sleep)
    return Profile(
        name=name, source=file,
        description=data.get("description", ""),
        model=model, served_model_name=served,
        aliases=aliases,
        host=host, port=port,
        startup_timeout=float(data.get("startup_timeout", 900)),
        engine=MappingProxyType(engine), memory=memory,
        env=MappingProxyType(env),
        sleep=sleep,
        idle_sleep=data.get("idle_sleep"), idle_stop=data.get("idle_stop"),
        restart=restart, max_restarts=max_restarts,
        api_key=data.get("api_key"), stack=stack, share_gpu=data.get("share_gpu", False),
        gpus=gpus, gpu_indices=gpu_indices, parallel=parallel,
    )


def to_dict(p: Profile) -> dict[str, Any]:
    """The profile as merged (extends applied): what `mm profiles show` prints and results record."""
    doc = {k: v for k, v in {
        "description": p.description, "model": p.model, "served_model_name": p.served_model_name,
        "aliases": list(p.aliases), "host": p.host, "port": p.port, "startup_timeout": p.startup_timeout,
        "restart": p.restart, "max_restarts": p.max_restarts, "idle_sleep": p.idle_sleep,
        "idle_stop": p.idle_stop, "stack": list(p.stack), "share_gpu": p.share_gpu,
    }.items() if v not in (None, [], "")}
    if p.gpus > 1 or p.gpu_indices:
        doc.update(gpus=list(p.gpu_indices) or p.gpus, **({"parallel": p.parallel} if p.parallel else {}))
    doc["sleep"] = {"enabled": p.sleep.enabled, "level": p.sleep.level, "checkpoint": p.sleep.checkpoint}
    if p.memory is not None:
        doc["memory"] = p.memory.to_table()
    doc["engine"] = dict(p.engine)
    # Secrets are never printed or recorded in results: api keys and secret-looking variables.
    doc["env"] = masked_env(p.env)
    if p.api_key:
        doc["api_key"] = "***"
    return doc


def to_toml(p: Profile) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(p))
