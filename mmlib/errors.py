"""Errors written for the user: raised deep, printed once (one line) at the CLI edge."""
from __future__ import annotations


class MMError(Exception):
    """Anything mm reports to the user as one line, with what to change."""


def printable(text: str) -> str:
    """A key or name from user input, safe for one line: control characters shown escaped."""
    return text if text.isprintable() else repr(text)


class ProfileError(MMError):
    def __init__(self, file: str, message: str, fix: str = "", key: str = ""):
        self.file, self.key, self.fix = file, key, fix
        where = f"{file}: {printable(key)}: " if key else f"{file}: "
        super().__init__(where + printable(message) + (f" (fix: {printable(fix)})" if fix else ""))


class DaemonError(MMError):
    pass


class Refused(MMError):
    """A start mm will not make (the profile fails its checks, or this machine cannot serve it).
    Raised before anything is slept or stopped: what runs stays untouched. The proxy answers it with
    a 4xx at once."""

    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)
