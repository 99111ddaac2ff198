"""The Redis key layout (docs/redis-keys.md). Every key carries its tenant as a hash tag, so
all of one tenant's keys live in one Redis Cluster slot and its Lua scripts stay atomic."""

from __future__ import annotations

from dataclasses import dataclass

ID_SEPARATOR = ":"


def tenant_of_id(entry_id: str) -> str:
    """Entry ids are `<tenant>:<uuid hex>`; the tenant picks the keys without a lookup."""
    return entry_id.rpartition(ID_SEPARATOR)[0]


def tenant_of_exact_key(exact_key: str) -> str:
    """Exact keys are `<tenant>:<scope digest>:<prompt digest>` (routecache.cache.scope)."""
    return exact_key.split(":", 1)[0]


@dataclass(frozen=True)
class TenantKeys:
    prefix: str
    tenant: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.tenant}}}:"

    def entry(self, entry_id: str) -> str:
        return f"{self.base}e:{entry_id}"

    def exact(self, exact_key: str) -> str:
        return f"{self.base}x:{exact_key.split(':', 1)[1]}"

    def tag(self, tag: str) -> str:
        return f"{self.base}tag:{tag}"

    @property
    def lru(self) -> str:
        return f"{self.base}lru"

    @property
    def expiry(self) -> str:
        return f"{self.base}exp"

    @property
    def sync(self) -> str:
        return f"{self.base}sync"

    @property
    def events(self) -> str:
        return f"{self.base}events"

    @property
    def rate(self) -> str:
        return f"{self.base}rate"

    def spend(self, day: str) -> str:
        return f"{self.base}spend:{day}"


@dataclass(frozen=True)
class KeySpace:
    prefix: str = "rc"

    def of(self, tenant: str) -> TenantKeys:
        return TenantKeys(self.prefix, tenant)

    @property
    def api_keys(self) -> str:
        """The API key registry: one hash, digest → record (JSON). Not tenant-scoped: a lookup
        starts from a key, before its tenant is known."""
        return f"{self.prefix}:apikeys"
