"""The CLI's side of the control API: find the daemon (start it if needed) and call it over its socket."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import httpx

from mmlib import paths
from mmlib.errors import DaemonError

START_TIMEOUT_S = 20.0


def socket_path():
    return paths.state_dir() / "mm.sock"


def daemon_log():
    return paths.logs_dir() / "daemon.log"


class Client:
    def __init__(self, timeout: float | None = 10.0):
        self.sock = socket_path()
        headers = {"authorization": f"Bearer {os.environ['MM_API_KEY']}"} if os.environ.get("MM_API_KEY") else {}
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://mm",
                                 timeout=timeout, headers=headers)

    def alive(self) -> bool:
        if not self.sock.exists():
            return False
        try:
            return self.http.get("/ping", timeout=2.0).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    def ensure_daemon(self) -> "Client":
        if self.alive():
            return self
        log = daemon_log()
        with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            # Its own session: the daemon outlives this command and ignores the terminal's Ctrl-C.
            subprocess.Popen([sys.executable, "-m", "mmlib", "daemon"], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True, cwd=paths.PROJECT_ROOT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.alive():
                return self
            time.sleep(0.05)
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise DaemonError(f"the mm daemon did not start within {START_TIMEOUT_S:.0f} s; see {log}"
                          + (f": {tail[-1]}" if tail else ""))

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: Any = httpx.USE_CLIENT_DEFAULT) -> dict[str, Any]:
        """timeout=None waits as long as the daemon works (a first start can take minutes)."""
        try:
            r = self.http.request(method, path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            raise DaemonError(f"the daemon did not answer {path} in time; it keeps working: see `mm status`") from None
        except httpx.HTTPError as e:
            raise DaemonError(f"cannot reach the mm daemon ({e}); `mm daemon` runs it in the foreground") from None
        doc = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code >= 400:
            raise DaemonError(str(doc.get("error") or r.text))
        return doc

    def get(self, path: str) -> dict[str, Any]:
        return self.call("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None,
             timeout: Any = httpx.USE_CLIENT_DEFAULT) -> dict[str, Any]:
        return self.call("POST", path, body or {}, timeout)
