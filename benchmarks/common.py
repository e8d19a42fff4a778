"""What the benchmark scripts share: running mm as a user does, and writing a result file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mm(env: dict, *args: str) -> str:
    """The real CLI in a subprocess; its stdout, or exit with what it said."""
    r = subprocess.run([sys.executable, "-m", "mmlib", *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"mm {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def finish(lines: list[str], out: Path | None, env: dict) -> None:
    """Print the result lines, append them to `out`, and stop the run's daemon and its servers."""
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(text)
    subprocess.run([sys.executable, "-m", "mmlib", "daemon", "stop"], env=env, cwd=ROOT, capture_output=True)
