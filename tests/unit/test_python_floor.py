"""The Python floor: pyproject, the bootstrap and the README accept 3.10, so nothing in mmlib may need
more (vermin reads the code; a `sys.version_info` branch, as for tomllib/tomli, counts as guarded)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mmlib_runs_on_the_oldest_python_it_accepts():
    vermin = shutil.which("vermin", path=os.path.dirname(sys.executable)) or shutil.which("vermin")
    assert vermin, "vermin is missing: it comes with the dev extra (./mm test installs it)"
    proc = subprocess.run([vermin, "--target=3.10-", "--violations", "--no-tips", str(ROOT / "mmlib")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
