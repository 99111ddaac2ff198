"""API key → tenant. Keys are compared by SHA-256 digest; the plain key is never stored.

Two sources: the static digests of the settings (`tenants[].api_key_sha256`, changed by a
restart) and a key registry (routecache/router/keyring.py, changed at run time by the
`routecache keys` command). The registry is consulted on every call, so a revoked key fails
from the very next one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from routecache.domain import Tenant
from routecache.errors import Unauthenticated, Unavailable

if TYPE_CHECKING:
    from routecache.router.keyring import KeyRecord, KeyRegistry

log = logging.getLogger(__name__)

_ORPHANS_LOGGED_MAX = 10_000


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class KeyRegistryError(ValueError):
    """The registry file cannot be read, or is not a registry (JSON {"keys": [records]}), or
    one record of it (file or Redis) is damaged (routecache/router/keyring.py)."""


class KeyRegistryUnreadable(KeyRegistryError):
    """The registry as a whole cannot be read: every registered key's lookup fails alike."""


def check_sendable_key(api_key: str) -> None:
    """ValueError unless the key can be sent as gRPC metadata (printable ASCII): gRPC refuses
    any other only when a call is made, with an ExecuteBatchError that does not say why. The
    message names the character and its position, never the key."""
    for position, char in enumerate(api_key):
        if not " " <= char <= "~":
            raise ValueError(
                f"the API key has {char!r} at position {position}: only printable ASCII can be sent"
            )


def check_presentable_key(api_key: str) -> None:
    """ValueError unless some request can present the key, so that a digest of it (hash-key)
    can ever match: not empty (refused as missing), printable ASCII (check_sendable_key), and
    no space at either end (the server strips the Bearer token: servicer.api_key_of)."""
    if not api_key:
        raise ValueError("the API key is empty: a request without one is refused as missing")
    check_sendable_key(api_key)
    if api_key != api_key.strip():
        raise ValueError(
            "the API key starts or ends with a space: the server strips the token it is sent, "
            "so no request can present it"
        )


def reused_digest(first_owner: str, tenant: str, digest: str) -> str:
    """Why a static key digest is refused: listed again by `tenant`, after `first_owner`. The
    settings refuse it as they load and the authenticator as it is built (not only from
    settings); one wording for both, which tells a tenant's own repeat from a shared key."""
    where = (
        f"tenant {tenant} lists an API key digest twice"
        if first_owner == tenant
        else f"an API key digest is configured for tenants {first_owner} and {tenant}"
    )
    return f"{where}: {digest}"


class ApiKeyAuthenticator:
    def __init__(
        self,
        tenants: Iterable[tuple[Tenant, Iterable[str]]],
        registry: KeyRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`tenants` pairs each tenant with the hex SHA-256 digests of its static keys."""
        self._by_digest: dict[str, Tenant] = {}
        self._tenants: dict[str, Tenant] = {}
        for tenant, digests in tenants:
            self._tenants[tenant.name] = tenant
            for digest in digests:
                if (owner := self._by_digest.get(digest)) is not None:
                    raise ValueError(reused_digest(owner.name, tenant.name, digest))
                self._by_digest[digest] = tenant
        self._registry = registry
        self._clock = clock
        self._unreadable_logged: str | None = None  # until a lookup reads the registry again
        # Registered keys whose tenant is not configured, already logged: once per key, not
        # per call (any caller holding one would fill the log). Only registered records get
        # here, so the registry's size bounds it; the cap is for safety.
        self._orphans_logged: set[str] = set()

    def authenticate(self, api_key: str | None) -> Tenant:
        """The static keys only (no registry); see resolve."""
        tenant = self._by_digest.get(hash_api_key(_present(api_key)))
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant

    async def resolve(self, api_key: str | None) -> Tenant:
        """The tenant of a static or registered key; Unauthenticated for any other."""
        digest = hash_api_key(_present(api_key))
        tenant = self._by_digest.get(digest)
        if tenant is not None:
            return tenant
        record = None if self._registry is None else await self._find(self._registry, digest)
        if record is None or not record.valid_at(self._clock()):
            raise Unauthenticated("unknown, revoked or expired API key")
        tenant = self._tenants.get(record.tenant)
        if tenant is None:
            self._log_orphan(record)
            raise Unauthenticated("the API key's tenant is not configured")
        return tenant

    def _log_orphan(self, record: KeyRecord) -> None:
        if record.key_id in self._orphans_logged:
            return
        if len(self._orphans_logged) >= _ORPHANS_LOGGED_MAX:
            self._orphans_logged.clear()  # logged again, once each: still not per call
        self._orphans_logged.add(record.key_id)
        log.warning("API key %s names tenant %r, which is not configured (logged once per key)",
                    record.key_id, record.tenant)  # fmt: skip

    async def _find(self, registry: KeyRegistry, digest: str) -> KeyRecord | None:
        try:
            record = await registry.find(digest)
        except KeyRegistryUnreadable as exc:
            # Not the caller's fault, and over once the file is mended: retry later. Logged
            # once, not per call: any caller, with any key, gets here.
            if str(exc) != self._unreadable_logged:
                log.warning("%s; calls with registered keys fail until it is mended", exc)
                self._unreadable_logged = str(exc)
            raise Unavailable("the API key registry cannot be read; try again later") from exc
        except KeyRegistryError as exc:
            # This key's own record: the registry logs it once (and serves the other keys).
            raise Unauthenticated("the API key's record is damaged in the key registry") from exc
        self._unreadable_logged = None
        return record


def _present(api_key: str | None) -> str:
    if not api_key:
        raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
    return api_key
