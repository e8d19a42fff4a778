"""Where mm keeps things. MM_HOME puts all of it under one folder (tests, portable installs)."""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

SHIPPED_PROFILES = Path(__file__).resolve().parent.parent / "profiles"
PROJECT_ROOT = SHIPPED_PROFILES.parent


def _dir(kind: str) -> Path:
    override = os.environ.get(f"MM_{kind.upper()}_DIR")  # e.g. tests share one model cache
    if override:
        return Path(override)
    home = os.environ.get("MM_HOME")
    if home:
        return Path(home) / kind
    finder = {"config": platformdirs.user_config_dir, "state": platformdirs.user_state_dir,
              "cache": platformdirs.user_cache_dir}[kind]
    return Path(finder("mm"))


def config_dir() -> Path:
    return _dir("config")


def user_profiles_dir() -> Path:
    return config_dir() / "profiles"


def state_dir() -> Path:
    """Daemon socket, state files and server logs: private to the user (0700)."""
    d = _dir("state")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def footprints_file() -> Path:
    """What the daemon measured each profile's server to hold, awake and asleep (kept across its
    restarts; `mm check` and "fill" read the residues)."""
    return state_dir() / "footprints.json"


def best_concurrency_file() -> Path:
    """The concurrency each profile's last sweep found best for batch work, per model, vLLM and card
    (`mm bench --sweep` writes it, `mm batch` reads it)."""
    return state_dir() / "best_concurrency.json"


def daemon_socket() -> Path:
    """Where the daemon listens and the CLI asks it (0600, in the private state folder)."""
    return state_dir() / "mm.sock"


def daemon_log() -> Path:
    return logs_dir() / "daemon.log"


def cache_dir() -> Path:
    d = _dir("cache")
    d.mkdir(parents=True, exist_ok=True)
    return d


def logs_dir() -> Path:
    d = state_dir() / "logs"
    d.mkdir(exist_ok=True, mode=0o700)
    return d


def results_dir() -> Path:
    """Where `mm bench` and `mm eval` write: runs/ beside the results of record, which git ignores,
    so a run never rewrites a tracked file (a run of record is moved out of it by hand)."""
    return Path(os.environ.get("MM_RESULTS_DIR", PROJECT_ROOT / "benchmark_results" / "runs"))


# A unix socket's path must fit in 108 bytes; state folders under deep homes (or test temp dirs)
# do not, so sockets get a short private folder of their own.
SOCKET_PATH_MAX = 100


def sockets_dir() -> Path:
    """Where servers' unix sockets live: MM_RUNTIME_DIR, else $XDG_RUNTIME_DIR/mm, else the state
    folder's sock/; created 0700 so only this user can reach the servers."""
    base = os.environ.get("MM_RUNTIME_DIR")
    if base:
        d = Path(base)
    elif os.environ.get("XDG_RUNTIME_DIR") and Path(os.environ["XDG_RUNTIME_DIR"]).is_dir():
        d = Path(os.environ["XDG_RUNTIME_DIR"]) / "mm"
    else:
        d = state_dir() / "sock"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d
