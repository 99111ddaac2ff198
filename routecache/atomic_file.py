"""Replacing a file so that readers, crashes and power losses see the old file or the new one,
never a torn or empty one: the cache snapshot, the key registry, the classifier's CURRENT
and artifacts, the embedding cache, the replay recordings. And publishing a folder whole: a
classifier version, which CURRENT may name only once all its files are on disk. And publishing
a file that code taking a path wrote: the ONNX graphs.

The text (or bytes) goes to PATH.tmp in the same folder (so the rename stays on one file system), is
synced, renamed over PATH, and the folder is synced: the rename is an entry of the folder, and
until that is on disk a power loss may bring the old file back though the write returned (a
revoked API key valid again, a promoted model out of service).

Writers of one path must be serialised by the caller (a lock): they share PATH.tmp.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO, cast


@contextlib.contextmanager
def replacing(
    path: Path, mode: int | None = None, *, like_existing: bool = False
) -> Iterator[TextIO]:
    """A text file (UTF-8) that takes PATH's place when the block ends, or is removed and
    leaves PATH alone when the block raises.

    `mode`: the new file's permission bits, exactly; None for a new file's default (0o666
    less the umask). `like_existing`: where PATH exists, the new file takes its permission
    bits instead, and its owner and group where this process may give a file away (root):
    a file another user (a service) reads stays readable to it. The folder must exist.
    """
    with _replacing(path, mode, binary=False, like_existing=like_existing) as out:
        yield cast(TextIO, out)


@contextlib.contextmanager
def replacing_bytes(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """`replacing` for bytes: a classifier artifact, an .npz written by numpy."""
    with _replacing(path, mode, binary=True) as out:
        yield cast(BinaryIO, out)


def publish_folder(staging: Path, target: Path) -> None:
    """Rename a filled STAGING folder to TARGET so that, power losses included, TARGET is
    absent or holds every file whole: a version folder the classifier's CURRENT may then name.

    Each file in STAGING is synced, then STAGING itself (the files' names are its entries),
    and TARGET's folder after the rename (the rename is its entry). Renames within one file
    system only, like os.rename; its errors (TARGET taken: EEXIST or ENOTEMPTY) are raised.
    """
    for entry in staging.iterdir():
        if entry.is_file():
            _sync(entry)
    _sync(staging)
    os.rename(staging, target)
    _sync(target.parent)


def publish_file(written: Path, target: Path) -> None:
    """Rename WRITTEN over TARGET so that, power losses included, TARGET is the old file or the
    new one whole: for files that code taking a path writes (an ONNX exporter), not a stream.

    WRITTEN is synced, renamed, and TARGET's folder synced (the rename is its entry). WRITTEN
    must be on TARGET's file system: in a scratch folder beside it, say.
    """
    _sync(written)
    os.replace(written, target)
    _sync(target.parent)


def existing(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def take_owner(descriptor: int, existing: os.stat_result) -> None:
    """The existing file's owner and group, given to the new one where this process may
    (root): `sudo routecache keys add` made the registry root's, unreadable to the service.
    Before any chmod: a chown clears set-id bits."""
    if os.geteuid() == 0:
        os.fchown(descriptor, existing.st_uid, existing.st_gid)


@contextlib.contextmanager
def _replacing(
    path: Path, mode: int | None, *, binary: bool, like_existing: bool = False
) -> Iterator[IO[Any]]:
    tmp = path.with_name(path.name + ".tmp")
    old = existing(path) if like_existing else None
    if old is not None:
        mode = stat.S_IMODE(old.st_mode)
    # A temp file left by a crash is removed, not reused: reused, it would keep its old mode
    # (perhaps readable by all) and, before the first write, its old content.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    # Created with the mode, not changed to it afterwards: never readable by others meanwhile.
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with (
            os.fdopen(descriptor, "wb") if binary else os.fdopen(descriptor, "w", encoding="utf-8")
        ) as out:
            if old is not None:
                take_owner(out.fileno(), old)
            if mode is not None:
                os.fchmod(out.fileno(), mode)  # the umask may have taken bits the caller wants
            yield out
            out.flush()
            os.fsync(out.fileno())  # the rename must never publish a file still in the cache
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _sync(path.parent)


def _sync(path: Path) -> None:
    """Sync a file or a folder (Linux syncs a file opened for reading too)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
