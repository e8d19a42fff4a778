"""Guard rails run before a server starts (filled in by the guard-rails feature)."""
from __future__ import annotations


def preflight(profile_name: str) -> None:
    """Raise MMError naming the file, key and fix when the profile cannot work."""
    from mmlib.profiles import load_profile

    load_profile(profile_name)
