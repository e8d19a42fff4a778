"""What a bench or eval run drives: the server it measures (Target) and the helper process that
measures it (vLLM's bench, lm-eval), run in its own session so Ctrl-C ends it cleanly, with progress
read from the server's own request counter."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmlib import paths
from mmlib.errors import MMError

TICK_S = 0.5
DONE_POLL_S = 0.05  # how often a kept helper's done file is looked for


@dataclass(frozen=True)
class Target:
    """The server to measure, reached through mm's endpoint: its requests count on the server like
    any client's, so idle sleep and switches wait for a bench or an eval instead of cutting it off."""
    url: str
    served_model_name: str
    tokenizer: str
    env: dict[str, str]
    pid: int | None = None
    api_key: str | None = None


def tokenizer_path(model: str) -> str:
    """The local folder (or hub id) whose tokenizer the server loaded."""
    from mmlib.profiles.vllm_cmd import resolve_model

    path = resolve_model(model)
    if not os.path.isabs(path) and (paths.PROJECT_ROOT / path).exists():
        return str(paths.PROJECT_ROOT / path)  # the daemon starts servers in the project root
    return path


def target_for(profile: Any, server: dict[str, Any]) -> Target:
    """`server` is the daemon's snapshot of it plus "endpoint" (mm's OpenAI endpoint) and
    "api_key" (the endpoint's key, if one is set)."""
    from mmlib.profiles.vllm_cmd import server_env

    if not server.get("endpoint"):
        raise MMError(f"{profile.name}: no endpoint to measure it through (state {server.get('state')}); "
                      f"see `mm status`")
    return Target(url=server["endpoint"], served_model_name=server["served_model_name"],
                  tokenizer=tokenizer_path(server.get("model") or profile.model), env=server_env(profile),
                  pid=server.get("pid"), api_key=server.get("api_key"))


def run_helper(argv: list[str], env: dict[str, str], log: Path, on_tick: Callable[[], None] | None = None,
               what: str = "the helper") -> None:
    """Run argv to completion, its output appended to log, ticking on_tick every TICK_S.

    Its own session: a terminal's Ctrl-C reaches mm alone, which then ends the helper's whole
    group and re-raises, so the caller can keep what finished."""
    with open(log, "ab") as out:
        out.write(f"\n# mm: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while proc.poll() is None:
            if on_tick:
                on_tick()
            try:
                proc.wait(TICK_S)
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        _end_group(proc)
        raise
    if proc.returncode != 0:
        raise MMError(f"{what} failed (exit {proc.returncode}); see {log}{last_line(log)}")


def last_line(log: Path) -> str:
    """": the log's last telling line" (vLLM's exit noise skipped), or ""."""
    from mmlib.system.files import tail_lines

    tail = [line for line in tail_lines(log, 40) if not line.startswith((" - leaked", "nanobind"))][-3:]
    return f": {tail[-1]}" if tail else ""


class KeptHelper:
    """A helper process kept for several jobs (a sweep's levels, so vLLM is imported once): a job is a
    JSON line on its stdin, and it says the job ended by writing the job's "done" file. Its own
    session, its output appended to log; Ctrl-C or a failure ends its whole group, as run_helper's."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, what: str = "the helper"):
        self.log, self.what = log, what
        with open(log, "ab") as out:
            out.write(f"\n# mm: {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=paths.PROJECT_ROOT)

    def run(self, job: dict[str, Any], done: Path, on_tick: Callable[[], None] | None = None) -> str:
        """Hand the helper a job and wait for its done file; what the file says."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
            ticked = 0.0
            while not done.exists():
                if self.proc.poll() is not None:
                    raise MMError(f"{self.what} ended (exit {self.proc.returncode}); see {self.log}"
                                  f"{last_line(self.log)}")
                if on_tick and time.monotonic() - ticked >= TICK_S:
                    on_tick()
                    ticked = time.monotonic()
                time.sleep(DONE_POLL_S)
        except BrokenPipeError:
            raise MMError(f"{self.what} ended early; see {self.log}{last_line(self.log)}") from None
        except BaseException:
            _end_group(self.proc)
            raise
        return done.read_text().strip()

    def close(self, grace: float = 10.0) -> None:
        """No more jobs: it exits on its own; its group is ended if it has not within `grace`."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(grace)
        except (OSError, subprocess.TimeoutExpired):
            pass
        _end_group(self.proc)


def _end_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue


def finished_requests(url: str, api_key: str | None = None, model: str | None = None) -> float | None:
    """Requests finished so far (vLLM's Prometheus counter), for progress bars; with `model`, only
    the lines labelled with that model (mm's endpoint re-exports every server's counters)."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url}/metrics", headers=headers, timeout=1.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    total, seen = 0.0, False
    for line in r.text.splitlines():
        if line.startswith("vllm:request_success_total") and (
                model is None or f'model_name="{model}"' in line or f'model="{model}"' in line):
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except (IndexError, ValueError):
                continue
    return total if seen else None


def log_path(profile: str, kind: str) -> Path:
    return paths.logs_dir() / f"{kind}-{profile}.log"


class NullUI:
    """What a run reports as it goes; the CLI's rich progress bars implement the same three calls."""

    def begin(self, name: str, total: int | None) -> None: ...
    def advance(self, done: float) -> None: ...
    def end(self, name: str, entry: dict[str, Any]) -> None: ...
