"""The API key registry in Redis: one hash, digest → record, read on every lookup so that a
key revoked by any admin is refused by every replica from its next call.

While Redis is down a replica answers from the records it last read (a key seen valid stays
valid, within its own expiry); a revocation made meanwhile applies once Redis is back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict

from redis.exceptions import WatchError

from routecache.backends.keys import KeySpace
from routecache.backends.link import RedisDown, RedisLink, guarded
from routecache.router.keyring import KeyRecord, KeyRegistryError, no_key


class RedisKeyRegistry:
    def __init__(self, link: RedisLink, keyspace: KeySpace) -> None:
        self._link = link
        self._key = keyspace.api_keys
        self._last_known: dict[str, KeyRecord] = {}  # found ones only: no growth by guessing

    async def find(self, sha256: str) -> KeyRecord | None:
        try:
            raw = await guarded(self._link, lambda: self._link.client.hget(self._key, sha256))
        except RedisDown:
            return self._last_known.get(sha256)
        if raw is None:
            self._last_known.pop(sha256, None)
            return None
        record = _decode(self._key, raw)
        self._last_known[sha256] = record
        return record

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
