"""A folder of classifier versions with a CURRENT pointer: add, promote, roll back, resolve.

Layout of the registry folder (settings: classifier.registry_dir):

    versions/VERSION/difficulty.skops + difficulty.json   every version ever added, kept
    CURRENT                                               one line: the version in service
    history.jsonl                                         one JSON object per pointer change

CURRENT is replaced atomically (write + rename, then the folder synced: routecache.atomic_file),
so a service watching it reads either the old or the new version, never half a name, and a
promotion that returned survives a power loss. A version is copied into a hidden staging
folder, its files and that folder synced, and renamed into versions/ (synced too): it appears
whole or not at all, and is on disk before CURRENT can name it. Rolling back moves CURRENT to
the version promoted before the current one; it copies nothing, so it takes milliseconds.

A pointer change is logged to the history before CURRENT moves, under a lock file, so
concurrent promotions apply in the order they are logged, and a crash between the two steps
leaves a version in service that the history knows, which can still be rolled back.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routecache.atomic_file import publish_folder, replacing
from routecache.classifier.model import (
    DEFAULT_ARTIFACT_NAME,
    ClassifierArtifactError,
    artifact_pair,
)
from routecache.file_lock import exclusive

POINTER = "CURRENT"
HISTORY = "history.jsonl"
LOCK = ".lock"
VERSIONS = "versions"


class RegistryError(Exception):
    """The registry has no such version, nothing to roll back to, or a damaged pointer."""


class CurrentMovedError(RegistryError):
    """CURRENT no longer names the version a promotion was decided against."""


class _Unchecked(enum.Enum):
    UNCHECKED = enum.auto()  # a sentinel: None already means "no version in service"


@dataclass(frozen=True)
class PointerChange:
    action: str  # "promote" or "rollback"
    version: str
    previous: str | None
    ts: float


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def artifact_path(self, version: str) -> Path:
        return self.root / VERSIONS / version / f"{DEFAULT_ARTIFACT_NAME}.skops"

    def versions(self) -> list[str]:
        folder = self.root / VERSIONS
        if not folder.is_dir():
            return []
        return sorted(
            p.name for p in folder.iterdir() if (p / f"{DEFAULT_ARTIFACT_NAME}.skops").is_file()
        )

    def current_version(self) -> str | None:
        """The version in service; RegistryError if CURRENT is not UTF-8 text (saved by hand
        in another encoding), OSError if it cannot be read."""
        path = self.root / POINTER
        try:
            name = path.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):  # no registry (or a file) at root
            return None
        except UnicodeDecodeError as error:
            raise RegistryError(f"{path}: not UTF-8 text ({error})") from None
        return name or None

    def current_artifact(self) -> Path | None:
        version = self.current_version()
        return None if version is None else self.artifact_path(version)

    def add(self, artifact: Path, version: str) -> Path:
        """Copy an artifact pair (NAME.skops + NAME.json) in as `version`, as it loads (checked
        against the .json's SHA-256); returns its .skops."""
        # CURRENT is read back stripped, so a name with whitespace around it could never serve.
        if not version or "/" in version or version.startswith(".") or version != version.strip():
            raise RegistryError(f"not a usable version name: {version!r}")
        source = Path(artifact)
        target = self.artifact_path(version)
        # One add at a time, so a version's staging folder is one add's alone, and one that a
        # crashed add left behind can be cleared.
        with self._locked(create=True):
            target.parent.parent.mkdir(exist_ok=True)  # the lock made the root
            if target.exists():
                raise RegistryError(f"version {version} is already in {self.root}")
            # Hidden in the root: on the same file system, so the rename is atomic and a
            # version folder appears whole or not at all.
            staging = self.root / f".adding-{version}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                # What loads from the pair, not its two files as they lie: after a save that
                # stopped before replacing NAME.skops, the .json names a staged copy instead.
                data, record = _pair(source, f"add {version}")
                (staging / f"{DEFAULT_ARTIFACT_NAME}.skops").write_bytes(data)
                (staging / f"{DEFAULT_ARTIFACT_NAME}.json").write_bytes(record)
                # Synced, so that CURRENT, synced too, can never name a version that a power
                # loss left empty or without its folder. (A versions folder made just now is
                # an entry of the root, synced with CURRENT's rename by the promotion.)
                publish_folder(staging, target.parent)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # A folder of that name without the artifact (put there by hand, or a copy).
                raise RegistryError(f"{target.parent} exists: remove it to add {version}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target

    def promote(
        self, version: str, expected_current: str | _Unchecked | None = _Unchecked.UNCHECKED
    ) -> None:
        """Point CURRENT at `version`. With `expected_current` (None: no version in service),
        only if CURRENT still names it, checked under the lock: a job that compared `version`
        with the model in service must not override a promotion or rollback made since
        (CurrentMovedError)."""
        with self._locked():
            if expected_current is not _Unchecked.UNCHECKED:
                self._require_current(expected_current)
            self._point_to(version, "promote")

    def rollback(self, to: str | None = None) -> str:
        """Point CURRENT at `to`, or at the version in service before the current one."""
        with self._locked():  # the target is chosen under the lock: no promotion slips between
            target = to if to is not None else self._previous_promotion()
            self._point_to(target, "rollback")
        return target

    def history(self) -> list[PointerChange]:
        path = self.root / HISTORY
        if not path.is_file():
            return []
        # Bytes, decoded a line at a time: a line not UTF-8 is reported with its number.
        data = path.read_bytes()
        lines = data.split(b"\n")
        # A record and its newline are one write: a last line without it is the torn tail of
        # an append that crashed, and that change never took effect. (With it, the last
        # element is the empty rest after the final newline.)
        lines = lines[:-1]
        changes = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                changes.append(_change_from(line.decode("utf-8")))
            # UnicodeDecodeError is a ValueError; RecursionError: a line nested past Python's
            # limit (a hand edit gone wrong), a traceback otherwise.
            except (ValueError, TypeError, RecursionError) as error:
                raise RegistryError(f"{path}:{number}: damaged history line ({error})") from None
        return changes

    def _previous_promotion(self) -> str:
        current = self.current_version()
        if current is None:
            raise RegistryError(
                f"no version in service (no {self.root / POINTER}): nothing to roll back;"
                " is this the registry folder?"
            )
        stack = self._service_stack()
        if current not in stack:
            raise RegistryError(f"version in service {current!r} was never promoted here")
        index = len(stack) - 1 - stack[::-1].index(current)
        earlier = [v for v in stack[:index] if v != current]
        if not earlier:
            raise RegistryError(
                f"nothing was promoted before {current}: no version to roll back to"
            )
        return earlier[-1]

    def _service_stack(self) -> list[str]:
        """The versions in service, oldest first, with rolled-back ones popped off.

        A rollback withdraws every version promoted after its target: a later rollback must
        never put a version back that was pulled from service (promote v1, v2, roll back,
        promote v3, roll back: v1, not v2).
        """
        stack: list[str] = []
        for change in self._applied():
            if change.action == "rollback" and change.version in stack:
                del stack[len(stack) - stack[::-1].index(change.version) :]
            else:
                stack.append(change.version)
        return stack

    def _applied(self) -> list[PointerChange]:
        """The history less changes logged whose pointer move never happened (a crash between
        the two steps): the next change starts from another version, or, for the last one,
        CURRENT names another."""
        changes = self.history()
        if not changes:  # else zip below pairs no change with CURRENT: a ValueError
            return []
        current = self.current_version()
        following = [c.previous for c in changes[1:]] + [current]
        return [c for c, after in zip(changes, following, strict=True) if after == c.version]

    def _require_current(self, expected: str | None) -> None:
        current = self.current_version()
        if current != expected:
            raise CurrentMovedError(
                f"{self.root / POINTER} names {current or 'no version'}, "
                f"expected {expected or 'no version'}"
            )

    def _point_to(self, version: str, action: str) -> None:
        """Log the change, then move CURRENT; the caller holds the lock."""
        if not self.artifact_path(version).is_file():
            raise RegistryError(f"no version {version!r} in {self.root}")
        # A version that cannot load (its model not its .json's, as an add before adds checked
        # could leave) would fail every service that follows CURRENT: refused here instead.
        _pair(self.artifact_path(version), f"{action} {version}")
        self._append_history(PointerChange(action, version, self.current_version(), time.time()))
        # One writer at a time (under the lock). The umask's mode, not a private one: the
        # service reading CURRENT may run as another user than the job that promotes.
        with replacing(self.root / POINTER) as pointer:
            pointer.write(version + "\n")

    def _append_history(self, change: PointerChange) -> None:
        path = self.root / HISTORY
        data = path.read_bytes() if path.is_file() else b""
        if data and not data.endswith(b"\n"):
            # The torn tail of an append that crashed: that change never took effect (CURRENT
            # moves after its record), and leaving it would glue it to the record below.
            with path.open("r+b") as log:
                log.truncate(data.rfind(b"\n") + 1)
        with path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(vars(change)) + "\n")
            log.flush()
            os.fsync(log.fileno())  # on disk before CURRENT moves, power loss included

    def _locked(self, create: bool = False) -> contextlib.AbstractContextManager[None]:
        """Serialises adds and pointer changes across processes and threads. Only an add may
        make the registry folder: a promotion or rollback needs versions already in it, and
        the lock file would make a mistyped --registry path on disk."""
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"{self.root} is a file: is this the registry folder?")
        if not create and not self.root.is_dir():
            raise RegistryError(f"{self.root}: no such folder: is this the registry folder?")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file above it: NotADirectoryError or FileExistsError
            raise RegistryError(
                f"{self.root}: cannot make the registry folder ({error.strerror})"
            ) from None
        return exclusive(self.root / LOCK)


def _pair(artifact: Path, doing: str) -> tuple[bytes, bytes]:
    """The pair at `artifact` as it loads, named as a version's files (model.artifact_pair);
    RegistryError saying what could not be done if it would not load."""
    try:
        return artifact_pair(artifact, DEFAULT_ARTIFACT_NAME)
    except ClassifierArtifactError as error:
        raise RegistryError(f"cannot {doing}: {error}") from None


def _change_from(line: str) -> PointerChange:
    record: dict[str, Any] = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    change = PointerChange(**record)
    if change.action not in ("promote", "rollback") or not isinstance(change.version, str):
        raise ValueError(f"not a pointer change: {line.strip()[:80]}")
    return change
