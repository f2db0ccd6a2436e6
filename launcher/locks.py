"""Exclusive locks (flock) a launcher holds on its run directory and its output for as long as it
runs: a second pdlaunch on either is refused before it writes anything. No torch here."""
from __future__ import annotations

import fcntl

from contracts.errors import UserError

_HELD = {}  # path -> open file


def hold(path: str, busy: str) -> None:
    """An exclusive lock on `path` (opened for appending, created if missing); `busy`: the error
    when another process holds it. Taken once per process (a bench runs several jobs)."""
    if path in _HELD:
        return
    f = open(path, "a", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(busy) from None
    _HELD[path] = f


def holds(path: str) -> bool:
    return path in _HELD


def release_all() -> None:
    """When the command is done (the process exits anyway; this serves callers of cli.main)."""
    while _HELD:
        _HELD.popitem()[1].close()
