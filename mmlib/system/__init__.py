"""Wrappers of the outside things mm touches, one each: NVML (nvml), the process tree (proctree),
ports (net), atomic file writes and log tails (files), what a process tree holds (usage), and the
clock (clock).

Nothing here knows about profiles, servers or the CLI; every other package may import it.
"""
