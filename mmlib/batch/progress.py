"""How far a batch run is: a rich progress line on a terminal
(`batch chat  ━━━━━━━  812/2000 samples  1,930 tok/s  ETA 0:41`), a plain line every ~10 s when
stderr is a file or a pipe (logs stay readable), and the closing summary."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

PLAIN_EVERY_S = 10.0


@dataclass
class Stats:
    """A run's counts, kept by the runner, read by the progress display and the summary."""
    total: int  # samples the input asks for (ids x n)
    done_before: int  # already in OUTPUT when the run began
    written: int = 0  # samples this run wrote
    output_tokens: int = 0
    requests: int = 0  # requests answered
    failed_requests: int = 0
    failed_samples: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    interrupted: bool = False
    aborted: str | None = None  # why the run stopped early

    @property
    def done(self) -> int:
        return self.done_before + self.written

    def elapsed(self, now: float | None = None) -> float:
        end = self.ended if self.ended is not None else (now if now is not None else time.monotonic())
        return max(end - self.started, 1e-9)

    def tokens_per_s(self, now: float | None = None) -> float:
        return self.output_tokens / self.elapsed(now)

    def eta_s(self, now: float | None = None) -> float | None:
        left = self.total - self.done - self.failed_samples
        if left <= 0:
            return 0.0
        if not self.written:
            return None
        return left * self.elapsed(now) / self.written


def clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def line(label: str, stats: Stats, now: float | None = None) -> str:
    """812/2000 samples  1,930 tok/s  ETA 0:41 (the plain progress line, without the bar)."""
    failed = f"  {stats.failed_samples:,} failed" if stats.failed_samples else ""
    return (f"{label}  {stats.done:,}/{stats.total:,} samples  {stats.tokens_per_s(now):,.0f} tok/s  "
            f"ETA {clock_text(stats.eta_s(now))}{failed}")


class PlainProgress:
    """A line every `every_s` (stderr is not a terminal)."""

    def __init__(self, label: str, stats: Stats, out: TextIO, every_s: float = PLAIN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.stats, self.out, self.every_s, self.clock = label, stats, out, every_s, clock
        self.last = clock()

    def start(self) -> None:
        self.last = self.clock()

    def update(self) -> None:
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.out.write(line(self.label, self.stats, now) + "\n")
            self.out.flush()

    def stop(self) -> None:
        pass


class RichProgress:
    """One live line on the terminal: bar, done/total samples, output tok/s, ETA."""

    def __init__(self, label: str, stats: Stats, out: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.stats = stats
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} samples"),
            TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[failed]}", style="red"),
            console=Console(file=out), refresh_per_second=4, transient=False)
        self.task = self.progress.add_task(label, total=stats.total, completed=stats.done, rate="", eta="-:--",
                                           failed="")

    def start(self) -> None:
        self.progress.start()

    def update(self) -> None:
        s = self.stats
        self.progress.update(self.task, completed=s.done, rate=f"{s.tokens_per_s():,.0f} tok/s",
                             eta=clock_text(s.eta_s()),
                             failed=f"{s.failed_samples:,} failed" if s.failed_samples else "")

    def stop(self) -> None:
        self.update()
        self.progress.stop()


def progress_for(label: str, stats: Stats, out: TextIO | None = None) -> Any:
    out = out or sys.stderr
    return RichProgress(label, stats, out) if out.isatty() else PlainProgress(label, stats, out)


def summary(stats: Stats, output: str) -> str:
    """The closing line: samples written, failed, wall time, output tok/s, requests/s."""
    wall = stats.elapsed()
    failed = f"{stats.failed_samples:,} failed ({stats.failed_requests:,} requests)" if stats.failed_requests \
        else "0 failed"
    retried = f", {stats.retries:,} retries" if stats.retries else ""
    took = f"{wall:.1f} s" if wall < 60 else clock_text(wall)
    return (f"wrote {stats.written:,} samples to {output} ({stats.done:,}/{stats.total:,} there now), {failed}"
            f"{retried}; {took} wall, {stats.tokens_per_s():,.0f} output tok/s, {stats.requests / wall:,.1f} "
            f"requests/s")
