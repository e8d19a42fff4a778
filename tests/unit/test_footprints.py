"""What each profile was measured to hold on the GPU is kept across daemon restarts, so the first
switch after one counts real bytes, not a guess."""
from __future__ import annotations

import asyncio

from mmlib.profiles.config import Config
from mmlib.serve.daemon import Daemon, footprints_path
from mmlib.serve.memory import Footprint


def test_measured_footprints_survive_a_daemon_restart(mm_env):
    async def go():
        first = Daemon(Config())
        first.scheduler.footprints[("chat", "Qwen/Qwen2.5-7B-Instruct-AWQ")] = Footprint(9 << 30, 1 << 30, measured=True)
        first.scheduler.footprints[("guess", None)] = Footprint(5 << 30, 1 << 30)  # predicted: not kept
        first.save_footprints()
        assert oct(footprints_path().stat().st_mode & 0o777) == "0o600"
        second = Daemon(Config())
        second.load_footprints()
        assert second.scheduler.footprints == {("chat", "Qwen/Qwen2.5-7B-Instruct-AWQ"):
                                               Footprint(9 << 30, 1 << 30, measured=True)}
    asyncio.run(go())
