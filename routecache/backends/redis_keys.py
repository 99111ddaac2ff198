"""The API key registry in Redis: one hash, digest → record, read on every lookup so that a
key revoked by any admin is refused by every replica from its next call.

While Redis is down a replica answers from the records it read in the last
LAST_KNOWN_SECONDS before the outage began (a key seen valid then stays valid, within its own
expiry, for the whole outage); a revocation made meanwhile, or in that window before it,
applies once Redis is back. Older copies are not used: a key revoked while Redis was up, and
not looked up here since, must not come back with an outage.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict

from redis.exceptions import WatchError

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisDown, RedisLink, guarded
from routecache.router.keyring import KeyRecord, KeyRegistryError, no_key

log = logging.getLogger(__name__)

LAST_KNOWN_SECONDS = 600.0


class RedisKeyRegistry:
    def __init__(
        self,
        link: RedisLink,
        keyspace: KeySpace,
        *,
        last_known_seconds: float = LAST_KNOWN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._link = link
        self._key = keyspace.api_keys
        self._window = last_known_seconds
        self._clock = clock
        # Found ones only (no growth by guessing), with when they were read.
        self._last_known: dict[str, tuple[KeyRecord, float]] = {}
        self._down_since: float | None = None if link.up else clock()
        self._warned: set[str] = set()  # damaged records already logged
        link.subscribe(self._health_changed)

    async def _health_changed(self, up: bool) -> None:
        self._down_since = None if up else self._clock()

    async def find(self, sha256: str) -> KeyRecord | None:
        try:
            raw = await guarded(self._link, lambda: self._link.client.hget(self._key, sha256))
        except RedisDown:
            return self._known_before_outage(sha256)
        if raw is None:
            self._last_known.pop(sha256, None)
            return None
        try:
            record = _decode(self._key, raw)
        except KeyRegistryError as exc:
            self._last_known.pop(sha256, None)
            # Once per damage, as the file registry does: only a registered key's caller gets
            # here, so the damages seen are bounded by the registry's size.
            if str(exc) not in self._warned:
                self._warned.add(str(exc))
                log.warning("%s; its key is refused, the other keys are served", exc)
            raise
        self._last_known[sha256] = (record, self._clock())
        return record

    def _known_before_outage(self, sha256: str) -> KeyRecord | None:
        if (known := self._last_known.get(sha256)) is None:
            return None
        record, read_at = known
        # From when the outage began (now, for a call Redis refused while up): a copy read
        # long before may miss a revocation made while Redis was up.
        began = self._clock() if self._down_since is None else self._down_since
        return record if read_at >= began - self._window else None

    async def put(self, record: KeyRecord) -> None:
        await self._link.client.hset(self._key, record.sha256, _encode(record))

    async def update(
        self,
        key_id: str,
        change: Callable[[KeyRecord], KeyRecord],
        *,
        also_put: KeyRecord | None = None,
    ) -> KeyRecord:
        # WATCH: if another admin writes the registry between this read and this write, the
        # write is dropped and made again on top of theirs. MULTI: both records or neither.
        async with self._link.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._key)
                    current = _of_id(self._key, await pipe.hgetall(self._key), key_id)
                    changed = change(current)
                    written = [changed] if also_put is None else [changed, also_put]
                    pipe.multi()
                    pipe.hset(self._key, mapping={r.sha256: _encode(r) for r in written})
                    await pipe.execute()
                    return changed
                except WatchError:
                    continue

    async def records(self) -> list[KeyRecord]:
        raw = await self._link.client.hgetall(self._key)
        return [_decode(self._key, v) for v in raw.values()]


def _encode(record: KeyRecord) -> str:
    return json.dumps(asdict(record), sort_keys=True)


def _decode(key: str, body: bytes) -> KeyRecord:
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested too deeply
        raise KeyRegistryError(f"key registry {key} in Redis: a damaged record ({exc})") from exc
    try:
        return KeyRecord.from_fields(fields)  # the file registry's check
    except KeyRegistryError as exc:
        raise KeyRegistryError(f"key registry {key} in Redis: {exc}") from exc


def _of_id(key: str, raw: dict[bytes, bytes], key_id: str) -> KeyRecord:
    for body in raw.values():
        record = _decode(key, body)
        if record.key_id == key_id:
            return record
    raise no_key(key_id)
