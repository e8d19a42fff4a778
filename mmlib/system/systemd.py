"""The systemd user unit that starts mm's daemon at login (`mm service install|remove`), and whether
it is installed and running (`mm doctor`). systemctl is run as a list of arguments, never a shell."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT = "mm.service"
# Variables the daemon (and the vLLM servers it starts) read, passed on when set at install time.
PASSED_ENV = ("MM_HOME", "MM_CONFIG_DIR", "MM_STATE_DIR", "MM_CACHE_DIR", "MM_PROXY_HOST", "MM_PROXY_PORT",
              "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES")


def unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "systemd" / "user"


def unit_path() -> Path:
    return unit_dir() / UNIT


def _quote(value: str) -> str:
    """A value for Environment= / ExecStart=: double-quoted, with systemd's escapes ('%' is a specifier)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def _path(path: Path) -> str:
    """A path setting (WorkingDirectory=, EnvironmentFile=) takes the rest of the line as is; only
    specifiers need escaping."""
    return str(path).replace("%", "%%")


def render_unit(python: str, workdir: Path, env: dict[str, str], env_file: Path) -> str:
    """The unit text. KillMode=mixed: a stop sends SIGTERM to the daemon alone, which stops its vLLM
    servers politely (SIGTERM, then SIGKILL after 15 s); anything left after TimeoutStopSec is killed."""
    lines = [
        "[Unit]",
        "Description=mm: local LLMs with vLLM behind one OpenAI endpoint",
        "Documentation=file://" + str(workdir / "README.md"),
        "After=network.target",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={_path(workdir)}",
        f"ExecStart={_quote(python)} -m mmlib daemon",
        "Environment=PYTHONUNBUFFERED=1",
        *(f"Environment={_quote(f'{k}={v}')}" for k, v in sorted(env.items())),
        # Secrets such as HF_TOKEN or MM_API_KEY go here, not into the unit (optional file).
        f"EnvironmentFile=-{_path(env_file)}",
        "Restart=on-failure",
        "RestartSec=3",
        "KillMode=mixed",
        "TimeoutStopSec=40",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def passed_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if environ is None else environ)
    return {k: environ[k] for k in PASSED_ENV if environ.get(k)}


@dataclass(frozen=True)
class ServiceState:
    installed: bool
    enabled: str  # systemctl is-enabled: "enabled", "disabled", ... or "unknown"
    active: str  # systemctl is-active: "active", "inactive", "failed", ... or "unknown"
    path: Path
    note: str = ""  # why systemctl could not say


def has_systemctl() -> bool:
    return shutil.which("systemctl") is not None


def systemctl(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True, timeout=timeout)


def _ask(*args: str) -> tuple[str, str]:
    """(answer, problem): systemctl's one-word answer, or why there is none (no user manager)."""
    try:
        r = systemctl(*args, timeout=5.0)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "unknown", str(e)
    out = r.stdout.strip().splitlines()
    if out and out[0] in ("enabled", "disabled", "static", "masked", "linked", "indirect", "enabled-runtime",
                          "active", "inactive", "failed", "activating", "deactivating", "reloading"):
        return out[0], ""
    return "unknown", (r.stderr.strip().splitlines() or ["no answer"])[0]


def state() -> ServiceState:
    path = unit_path()
    if not path.is_file():
        return ServiceState(False, "not installed", "unknown", path)
    if not has_systemctl():
        return ServiceState(True, "unknown", "unknown", path, "systemctl not found")
    enabled, problem = _ask("is-enabled", UNIT)
    active, problem2 = _ask("is-active", UNIT)
    return ServiceState(True, enabled, active, path, problem or problem2)


def install_commands() -> list[list[str]]:
    return [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", UNIT]]


def remove_commands() -> list[list[str]]:
    return [["systemctl", "--user", "disable", "--now", UNIT], ["systemctl", "--user", "daemon-reload"]]


def write_unit(text: str) -> Path:
    from mmlib.system.files import replace_atomic

    path = unit_path()
    replace_atomic(path, text, 0o644)
    return path


def run_commands(commands: list[list[str]]) -> str:
    """Run them in order; '' when all succeeded, else the first failure's message."""
    if not has_systemctl():
        return "systemctl not found"
    for argv in commands:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(argv)}: {e}"
        if r.returncode != 0:
            last = ((r.stderr or r.stdout).strip().splitlines() or ["failed"])[-1]
            return f"{' '.join(argv)}: {last}"[:300]
    return ""


def default_python() -> str:
    return sys.executable
