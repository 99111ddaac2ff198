"""API key → tenant. Keys are compared by SHA-256 digest; the plain key is never stored."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from routecache.domain import Tenant
from routecache.errors import Unauthenticated


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class ApiKeyAuthenticator:
    def __init__(self, tenants: Iterable[tuple[Tenant, Iterable[str]]]) -> None:
        """`tenants` pairs each tenant with the hex SHA-256 digests of its keys."""
        self._by_digest: dict[str, Tenant] = {}
        for tenant, digests in tenants:
            for digest in digests:
                if digest in self._by_digest:
                    raise ValueError(f"an API key digest is configured for two tenants: {digest}")
                self._by_digest[digest] = tenant

    def authenticate(self, api_key: str | None) -> Tenant:
        if not api_key:
            raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
        tenant = self._by_digest.get(hash_api_key(api_key))
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant
