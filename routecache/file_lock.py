"""An exclusive lock on a file, held by whoever opened it: other processes and other threads
(each open is its own lock) wait. For the admin writes that must not interleave: the key
registry file, the classifier registry's pointer."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from routecache.atomic_file import existing, take_owner


@contextlib.contextmanager
def exclusive(lock_path: Path, like: Path | None = None) -> Iterator[None]:
    """Holds the lock of `lock_path`, made if missing. `like`: the file the lock guards; a new
    lock takes its owner, group and mode, as a replaced registry keeps them (see
    atomic_file.replacing's like_existing), so that `sudo routecache keys ...` leaves no lock
    the file's own user cannot take."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _open(lock_path, like)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _open(lock_path: Path, like: Path | None) -> int:
    # Read-only: flock needs no write access, so anyone who may read the lock may take it (a
    # lock root made 0644 with an older version included). Never written: its content is none.
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        descriptor = os.open(lock_path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return os.open(lock_path, flags)
    try:
        _like(descriptor, like)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _like(descriptor: int, like: Path | None) -> None:
    """A new lock's owner and mode: those of `like` where it exists (the owner only where this
    process may give a file away: root), else its creator's alone (0600)."""
    guarded = existing(like) if like is not None else None
    if guarded is not None:
        take_owner(descriptor, guarded)
        os.fchmod(descriptor, stat.S_IMODE(guarded.st_mode) & 0o666)
