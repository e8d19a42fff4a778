"""What each profile was measured to hold on the GPU is kept across daemon restarts, so the first
switch after one counts real bytes, not a guess."""
from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

from mmlib.guard import fit
from mmlib.guard.fit import GIB, Footprint
from mmlib.profiles.config import Config
from mmlib.profiles.profile import load_profile
from mmlib.serve.daemon import Daemon, footprints_path
from mmlib.serve.memory import CardMemory


def test_measured_footprints_survive_a_daemon_restart(mm_env):
    async def go():
        first = Daemon(Config())
        chat = load_profile("chat")
        first.scheduler.footprints[("chat", chat.model, chat.sizing)] = Footprint(9 << 30, 1 << 30, measured=True)
        first.scheduler.footprints[("guess", None, "")] = Footprint(5 << 30, 1 << 30)  # predicted: not kept
        first.save_footprints()
        assert oct(footprints_path().stat().st_mode & 0o777) == "0o600"
        second = Daemon(Config())
        second.load_footprints()
        assert second.scheduler.footprints == {("chat", chat.model, chat.sizing):
                                               Footprint(9 << 30, 1 << 30, measured=True)}
        assert second.scheduler.footprint(chat) == Footprint(9 << 30, 1 << 30, measured=True)
    asyncio.run(go())


def test_a_footprint_measured_under_other_settings_is_not_used(mm_env):
    """A stale awake peak, measured before a profile was resized, made mm evict sleepers for room it no
    longer needed."""
    async def go():
        daemon = Daemon(Config())
        chat = load_profile("chat")
        daemon.scheduler.footprints[("chat", chat.model, chat.sizing)] = Footprint(11 << 30, 1 << 30, measured=True)
        smaller = dataclasses.replace(chat, engine={**chat.engine, "max_num_seqs": 4})
        assert smaller.sizing != chat.sizing
        assert daemon.scheduler.footprint(smaller) != Footprint(11 << 30, 1 << 30, measured=True)
    asyncio.run(go())


class OneCard:
    """NVML with one 80 GiB device, as CardMemory reads it."""
    available = True

    def device(self, position, with_processes=True):
        return SimpleNamespace(total=80 * GIB, free=80 * GIB, name="NVIDIA H100")


def test_a_profile_never_run_nor_predicted_gets_the_fits_estimate(mm_env):
    """One footprint type and one asleep estimate: without the preflight's answer the scheduler's card
    falls back to guard.fit's estimate without shapes (once 1.5 GiB asleep here, 0.79 there)."""
    card = fit.Card(capacity=12 * GIB, total=80 * GIB, name="NVIDIA H100", host_ram=0)
    for name in ("chat", "perf", "voice-stt"):
        p = load_profile(name)
        got = CardMemory(12 * GIB, nvml=OneCard()).predict(p)
        assert got == fit.predict(p, card).footprint and not got.measured
        assert got.asleep == (fit.ASLEEP_BASE if p.sleep.enabled else 0)
