"""The CLI's side of the control API: find the daemon (start it if needed) and call it over its socket.

Uses the standard library's http.client over the unix socket: importing httpx alone costs ~100 ms,
a third of what `mm status` may take in all.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any

from mmlib import paths
from mmlib.errors import DaemonError
from mmlib.profiles.config import client_api_key

START_TIMEOUT_S = 20.0
WAIT = None  # timeout value meaning: as long as the daemon works (a first start can take minutes)


class KeyRefused(DaemonError):
    """The daemon answered 401: it runs with another API key than this command sends."""


def key_refused(sent: bool) -> KeyRefused:
    """The one line for a daemon that refuses the key (or its absence): it keeps the key it started with."""
    config = paths.config_dir() / "config.toml"
    if sent:
        return KeyRefused(f"the running mm daemon refused this command's API key: it started with another one "
                          f"(api_key in {config} or MM_API_KEY changed since); put the old key back, or "
                          "`mm daemon stop` and retry (it starts again with the new key)")
    return KeyRefused(f"the running mm daemon wants the API key it started with, and this command sends none "
                      f"(api_key is gone from {config} and MM_API_KEY is unset); put the key back, or "
                      "`mm daemon stop` and retry (it starts again without one)")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("mm", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Client:
    def __init__(self, timeout: float | None = 10.0, sock=None, api_key: str | None = None):
        self.sock = sock or paths.daemon_socket()
        self.timeout = timeout
        self.headers = {"content-type": "application/json"}
        api_key = api_key or client_api_key()
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    def _request(self, method: str, path: str, body: dict | None, timeout: float | None) -> tuple[int, Any]:
        conn = UnixHTTPConnection(str(self.sock), timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=self.headers)
            r = conn.getresponse()
            raw = r.read()
        finally:
            conn.close()
        try:
            return r.status, json.loads(raw) if raw else {}
        except ValueError:
            return r.status, {"error": raw.decode(errors="replace")}

    def alive(self) -> bool:
        if not self.sock.exists():
            return False
        try:
            return self._request("GET", "/ping", None, 2.0)[0] in (200, 401)
        except OSError:
            return False

    def ensure_daemon(self) -> "Client":
        if self.alive():
            return self
        log = paths.daemon_log()
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

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: Any = "default") -> dict:
        try:
            status, doc = self._request(method, path, body, self.timeout if timeout == "default" else timeout)
        except TimeoutError:
            raise DaemonError(f"the daemon did not answer {path} in time; it keeps working: see `mm status`") from None
        except OSError as e:
            raise DaemonError(f"cannot reach the mm daemon ({e}); `mm daemon` runs it in the foreground") from None
        if status == 401:
            raise key_refused("authorization" in self.headers)
        if status >= 400:
            raise DaemonError(str(doc.get("error") or doc))
        return doc

    def daemon_pid(self) -> int | None:
        """The pid of this user's process listening on the socket, from the kernel (SO_PEERCRED): known
        even when the daemon refuses this command's key. None where nothing listens."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                s.connect(str(self.sock))
                pid, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
        except OSError:
            return None
        return pid if uid == os.getuid() else None

    def get(self, path: str) -> dict[str, Any]:
        return self.call("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: Any = "default") -> dict[str, Any]:
        return self.call("POST", path, body or {}, timeout)
