"""The API key registry: which key digest belongs to which tenant, and until when.

Only SHA-256 digests are stored; a new key is shown once, by the `routecache keys` command, and
never logged. Keys are added, rotated (the old one stays valid for an overlap, or not at all)
and revoked at run time: the file registry is re-read whenever the file changes (checked on
every lookup, so a revocation holds from the very next call) and the Redis one is read on
every lookup (see routecache/backends/redis_keys.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from routecache.atomic_file import replacing
from routecache.file_lock import exclusive
from routecache.router.auth import KeyRegistryError as KeyRegistryError
from routecache.router.auth import KeyRegistryUnreadable, hash_api_key

log = logging.getLogger(__name__)

KEY_PREFIX = "rck_"
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class KeyRecord:
    key_id: str  # public handle for the CLI and the logs; not derived from the key
    sha256: str
    tenant: str
    created_at: float
    # The end of a rotation's overlap, by the clock of the machine that rotated: compared with
    # the serving replica's clock, so the overlap is as exact as the clocks agree (NTP).
    expires_at: float | None = None
    # When it was revoked, or retired by a rotation with no overlap, by that machine's clock:
    # for the record only. It holds at once whatever the date, as a revocation must not wait
    # for a replica's clock to catch up with an admin's that is ahead.
    revoked_at: float | None = None

    @classmethod
    def from_fields(cls, fields: object) -> KeyRecord:
        """The record of fields read back from storage (a JSON object), for both registries.
        KeyRegistryError naming the key and what is wrong if they are no record: not an object,
        fields missing or unknown, or a field of another type (a hand-edited "revoked_at":
        "2026-01-01" would otherwise fail every later lookup with a TypeError, far from its
        cause, comparing it with the clock)."""
        if not isinstance(fields, dict):
            raise KeyRegistryError("key None: not a key record (not a JSON object)")
        key_id = fields.get("key_id")
        try:
            record = cls(**fields)
        except TypeError as exc:  # fields missing or unknown
            raise KeyRegistryError(f"key {key_id!r}: not a key record ({exc})") from exc
        if problem := record._wrong_field():
            raise KeyRegistryError(f"key {key_id!r}: {problem}")
        return record

    def _wrong_field(self) -> str | None:
        for name in ("key_id", "sha256", "tenant"):
            if not isinstance(getattr(self, name), str):
                return f"{name} must be text"
        for name in ("created_at", "expires_at", "revoked_at"):
            value = getattr(self, name)
            # NaN compares false with every time: a revoked key whose revoked_at is NaN is valid.
            if (value is None and name != "created_at") or (
                isinstance(value, int | float) and not isinstance(value, bool) and value == value
            ):
                continue
            return f"{name} must be a unix time in seconds"
        return None

    def valid_at(self, now: float) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or now < self.expires_at

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            # A rotation with no overlap ends the key at once too, as of its expiry.
            retired = self.expires_at is not None and self.expires_at <= self.revoked_at
            return "expired" if retired else "revoked"
        if self.expires_at is not None:
            return "expired" if now >= self.expires_at else "rotating"
        return "active"


class KeyRegistry(Protocol):
    """What authentication reads: the record of a digest, or None. KeyRegistryError if that
    digest's record is damaged; KeyRegistryUnreadable if the registry as a whole is."""

    async def find(self, sha256: str) -> KeyRecord | None: ...


class KeyAdmin(Protocol):
    """What the admin CLI writes; each change is visible to the next lookup."""

    async def put(self, record: KeyRecord) -> None: ...

    async def update(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        *,
        also_put: KeyRecord | None = None,
    ) -> KeyRecord:
        """Writes `change` of the record of `key_id` as it is now, and `also_put` if given, in
        one step with no other admin's write in between (two admins rotating and revoking a
        key at once must not undo each other); returns the changed record. KeyNotFound, and
        nothing written, if there is no such key, or whatever `change` raises."""
        ...

    async def records(self) -> list[KeyRecord]: ...


class KeyNotFound(LookupError):
    pass


class KeyNotLive(LookupError):
    """Rotating a revoked or expired key would hand its tenant a fresh key under its name."""


def no_key(key_id: str) -> KeyNotFound:
    return KeyNotFound(f"no key with id {key_id}")


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _new_key(tenant: str, now: float, api_key: str | None = None) -> tuple[str, KeyRecord]:
    plain = api_key or new_api_key()
    return plain, KeyRecord(secrets.token_hex(6), hash_api_key(plain), tenant, now)


async def add_key(
    admin: KeyAdmin, tenant: str, now: float, api_key: str | None = None
) -> tuple[str, KeyRecord]:
    """A new key for `tenant`: (the plain key, shown once; its record)."""
    plain, record = _new_key(tenant, now, api_key)
    await admin.put(record)
    return plain, record


async def _find_id(admin: KeyAdmin, key_id: str) -> KeyRecord:
    for record in await admin.records():
        if record.key_id == key_id:
            return record
    raise no_key(key_id)


async def rotate_key(
    admin: KeyAdmin, key_id: str, now: float, overlap_seconds: float
) -> tuple[str, KeyRecord, KeyRecord]:
    """A new key for the same tenant; the old one expires after the overlap (0: at once)."""
    old = await _find_id(admin, key_id)
    if not old.valid_at(now):
        raise KeyNotLive(
            f"key {key_id} is {old.status(now)}: only a live key is rotated"
            f" (`keys add --tenant {old.tenant}` issues a new one)"
        )
    plain, new = _new_key(old.tenant, now)

    def retire(current: KeyRecord) -> KeyRecord:
        # Revoked by another admin since the read above (at any time: its clock may be ahead
        # of ours): raised here, in the registry's write step, so that neither record is
        # written and the tenant of a revoked key (a leaked one, say) gets no fresh key.
        if current.revoked_at is not None:
            raise KeyNotLive(
                f"key {key_id} was revoked during the rotation: no new key was issued"
                f" (`keys add --tenant {current.tenant}` issues a new one)"
            )
        expires = now + overlap_seconds
        if current.expires_at is not None:
            expires = min(expires, current.expires_at)
        if overlap_seconds <= 0:  # at once, not when the serving replica's clock says `now`
            return replace(current, expires_at=expires, revoked_at=expires)
        return replace(current, expires_at=expires)

    # Of the record as it is when written, not as read above: a revocation made meanwhile stays
    # and fails the rotation. The new key is written in the same step: if the old one was
    # deleted or revoked meanwhile, nothing is (written first, it stayed valid, and was never
    # shown or was handed out for a revoked key).
    retired = await admin.update(key_id, retire, also_put=new)
    return plain, new, retired


async def revoke_key(admin: KeyAdmin, key_id: str, now: float) -> KeyRecord:
    """Revoked at once. Revoking a revoked key again keeps its first date (a machine whose
    clock is behind the first one's may move it earlier, never later)."""

    def revoke(current: KeyRecord) -> KeyRecord:
        first = current.revoked_at
        return replace(current, revoked_at=now if first is None else min(first, now))

    return await admin.update(key_id, revoke)


class FileKeyRegistry:
    """A JSON file of key records. Writers take an exclusive lock and replace the file
    atomically; readers notice a new file by its (inode, mtime, size) and re-read it."""

    def __init__(self, path: Path) -> None:
        # A relative path is the working directory's, as every path setting is: kept absolute
        # so that messages and logs name the very file (an admin in another folder edits
        # another one).
        self._path = path.absolute()
        self._seen: tuple[int, int, int] | None = None
        self._by_digest: dict[str, KeyRecord] = {}
        self._bad: dict[str, str] = {}  # digest of a damaged record → what is wrong with it
        self._warned: set[str] = set()  # damaged records already logged: once each, not per call
        # The bytes last parsed: a file changed too recently to trust its signature is read
        # on every lookup, but parsed and checked again only if it differs (at 10,000 keys a
        # parse is some 40 ms of the event loop; a compare of 2 MB, a fraction of one).
        self._parsed: bytes | None = None

    @property
    def path(self) -> Path:
        return self._path

    def check(self) -> None:
        """KeyRegistryError if the file is there but is no registry, or holds a damaged record
        (a missing one is empty)."""
        _read(self._path)
        self._refresh()

    async def find(self, sha256: str) -> KeyRecord | None:
        """The record of a digest. A damaged record fails the lookup of its own digest only (as
        in the Redis registry); the other keys are still served, and it is logged once."""
        self._refresh()
        if (problem := self._bad.get(sha256)) is not None:
            raise KeyRegistryError(problem)
        return self._by_digest.get(sha256)

    async def records(self) -> list[KeyRecord]:
        return _read(self._path)

    async def put(self, record: KeyRecord) -> None:
        with _locked(self._path):
            records = {r.key_id: r for r in _read(self._path)}
            records[record.key_id] = record
            _write(self._path, list(records.values()))

    async def update(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        *,
        also_put: KeyRecord | None = None,
    ) -> KeyRecord:
        # Read and written under the writers' lock: no other admin writes in between.
        with _locked(self._path):
            records = {r.key_id: r for r in _read(self._path)}
            if key_id not in records:
                raise no_key(key_id)
            records[key_id] = changed = change(records[key_id])
            if also_put is not None:
                records[also_put.key_id] = also_put
            _write(self._path, list(records.values()))
        return changed

    def _refresh(self) -> None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            self._forget()
            return
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature != self._seen:
            data = _read_bytes(self._path)
            if data is None:  # removed since the stat
                self._forget()
                return
            if data != self._parsed:
                self._parsed = None  # until parsed whole: an unreadable file raises each time
                self._load(*_parse(self._path, data))
                self._parsed = data
            # As git does with its index: a file changed within the timestamp granularity of
            # this read may change again with the same signature, so it is read again next time.
            racy = st.st_mtime_ns >= time.time_ns() - _RACY_NS
            self._seen = None if racy else signature

    def _forget(self) -> None:
        """No file: no keys, and nothing read of one."""
        self._seen, self._by_digest, self._bad, self._parsed = None, {}, {}, None

    def _load(
        self, records: list[KeyRecord], bad: list[tuple[str | None, KeyRegistryError]]
    ) -> None:
        self._by_digest = {r.sha256: r for r in records}
        self._bad = {}
        for digest, error in bad:
            if str(error) not in self._warned:
                log.warning("%s; its key is refused, the other keys are served", error)
            if digest is not None:
                self._bad[digest] = str(error)
        # Once per damage: a record mended and damaged again is logged again.
        self._warned = {str(error) for _, error in bad}


def _read(path: Path) -> list[KeyRecord]:
    """All the records, or KeyRegistryError if any one is damaged: for the check at start and
    the admin commands, which must not drop or rewrite a record they cannot read."""
    records, bad = _read_each(path)
    if bad:
        raise bad[0][1]
    return records


def _read_each(path: Path) -> tuple[list[KeyRecord], list[tuple[str | None, KeyRegistryError]]]:
    """The sound records, and each damaged one as (its digest if it has one as text, its
    error). KeyRegistryError if the file cannot be read or is no registry at all."""
    data = _read_bytes(path)
    return ([], []) if data is None else _parse(path, data)


def _read_bytes(path: Path) -> bytes | None:
    """The file's bytes; None if there is none. KeyRegistryUnreadable if it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyRegistryUnreadable(f"key registry {path}: cannot read it ({exc})") from exc


def _parse(
    path: Path, data: bytes
) -> tuple[list[KeyRecord], list[tuple[str | None, KeyRegistryError]]]:
    """_read_each of the file's bytes."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError: also not UTF-8, not JSON, or a
        # number past Python's 4,300 digits; RecursionError: nested too deeply
        raise KeyRegistryUnreadable(f"key registry {path}: cannot read it ({exc})") from exc
    items = _items(path, raw)
    records: list[KeyRecord] = []
    bad: list[tuple[str | None, KeyRegistryError]] = []
    for item in items:
        digest = item.get("sha256") if isinstance(item, dict) else None
        digest = digest if isinstance(digest, str) else None
        try:
            records.append(KeyRecord.from_fields(item))
        except KeyRegistryError as exc:
            bad.append((digest, KeyRegistryError(f"key registry {path}: {exc}")))
    return records, bad


def _items(path: Path, raw: object) -> list[object]:
    """The records of a registry: {"keys": [...]}, or {} (none yet). KeyRegistryUnreadable for
    any other JSON: a misspelled "kyes", or another program's file, read as an empty registry,
    would be replaced whole by the next `keys add`."""
    if raw == {}:
        return []
    if not isinstance(raw, dict) or set(raw) != {"keys"} or not isinstance(raw["keys"], list):
        if isinstance(raw, dict) and (others := sorted(set(raw) - {"keys"})):
            why = f'members other than "keys": {", ".join(map(repr, others))[:200]}'
        else:
            why = 'not a JSON object {"keys": [...]}'
        raise KeyRegistryUnreadable(f"key registry {path}: not a registry ({why})")
    items: list[object] = raw["keys"]
    return items


def _write(path: Path, records: list[KeyRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"keys": [asdict(r) for r in records]}, indent=1, sort_keys=True)
    # Digests only: a new registry is its owner's alone. One that exists keeps its mode and
    # (run as root) its owner: the service may be another user the operator let read it.
    # Writers hold the file's lock.
    with replacing(path, mode=0o600, like_existing=True) as out:
        out.write(body)


def _locked(path: Path) -> contextlib.AbstractContextManager[None]:
    # Owned like the registry: a lock left by `sudo routecache keys ...` must not stop the
    # registry's own user (the service's) from revoking a key.
    return exclusive(path.with_name(path.name + ".lock"), like=path)
