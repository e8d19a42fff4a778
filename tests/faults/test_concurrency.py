"""Two mm commands at once: one daemon, one server, nothing corrupted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def test_two_cold_commands_at_once_share_one_daemon_and_one_server(fake_mm):
    fake_mm.add_profile("shared")
    env = {**os.environ, **fake_mm.env}
    procs = [subprocess.Popen([sys.executable, "-m", "mmlib", "up", "shared", "--force"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    pids = {line.split("pid ")[1].split(")")[0] for out, _ in outs for line in out.splitlines() if "pid " in line}
    assert len(pids) == 1  # all three saw the same server
    daemons = [p for p in psutil.process_iter(["cmdline", "environ"])
               if p.info["cmdline"] and p.info["cmdline"][-2:] == ["mmlib", "daemon"]
               and (p.info["environ"] or {}).get("MM_HOME") == fake_mm.env["MM_HOME"]]
    assert len(daemons) == 1
    state = Path(fake_mm.env["MM_HOME"]) / "state" / "servers" / "shared.json"
    assert json.loads(state.read_text())["pid"] == int(pids.pop())
