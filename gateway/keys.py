"""API keys: who a request's ``Authorization`` header is, and the store behind the admin API.

Keys come from two places. ``Settings.api_keys`` (plain strings: every model, no limits; or
``ApiKeyConfig`` mappings) are fixed for the process's life. Keys issued through the admin API
(``sk-sy-`` + 32 random bytes, url-safe) live in Redis when ``redis_url`` is set, so every
replica and worker sees them, else in this process's memory only (lost on restart, not shared
between ``--workers``). Only ``sha256(key)`` is kept; the key itself is shown once, at
creation or rotation, and never logged, labelled or echoed in an error.

Authentication is on when ``api_keys`` is non-empty or ``admin_key`` is set; otherwise every
request is :data:`gateway.principal.ANONYMOUS` (the local default, no key needed).

The hot path, :meth:`KeyStore.authenticate`, is synchronous: parse ``Bearer <token>``,
sha256, one dict lookup, :func:`hmac.compare_digest` of the digests, and the
:class:`~gateway.principal.Principal` prebuilt for that key. It never waits on Redis.
:meth:`KeyStore.run` polls a version counter (``<prefix>keys:version``) every
``redis.keys_refresh_s`` and reloads the hash ``<prefix>keys`` (field = sha256 hex, value =
the key's JSON record, never the key) when it changed (each change adds a random step, so a
Redis that restarted empty does not repeat a version a replica already saw).

**Staleness**: a key created, revoked or rotated on another replica takes effect here within
``keys_refresh_s`` (the replica that made the change applies it at once). While Redis is down
the last loaded keys keep working (a revocation made meanwhile cannot reach this replica), and
admin changes are refused (503) rather than kept in one process.

Example::

    store = KeyStore(settings, link=None)
    issued = await store.create(KeySpec(name="ci", models=("m",)))
    store.authenticate(f"Bearer {issued.key}").allows("m", None)   # True
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import WatchError

from gateway.errors import (
    ClientError,
    KeyStoreUnavailable,
    NotFound,
    PermissionDenied,
    Unauthorized,
)
from gateway.metricspec import Label, MetricSpec
from gateway.principal import ANONYMOUS, Principal
from gateway.redislink import RedisLink
from gateway.settings import ApiKeyConfig, Settings, TenantConfig

log = logging.getLogger(__name__)

__all__ = [
    "KEY_PREFIX",
    "IssuedKey",
    "KeyRecord",
    "KeySpec",
    "KeyStore",
    "KeyStoreUnavailable",
    "KeysCollector",
    "bearer_token",
    "build_principal",
    "digest",
]

KEY_PREFIX = "sk-sy-"
MAX_KEYS = 100_000  # admin-issued keys kept (revoked ones included): bounds the hash
_TXN_TRIES = 5
_NO_KEY = "Incorrect or missing API key; send 'Authorization: Bearer <key>'."


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def digest(token: str) -> bytes:
    """sha256 of a key: what is stored and compared (keys are high-entropy random tokens)."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What a key may do (``None`` = every model / adapter, no limit)."""

    name: str | None = None
    models: tuple[str, ...] | None = None
    adapters: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    user_rpm: int | None = None
    user_tpm: int | None = None
    tenant: str | None = None
    priority: int | None = None

    @classmethod
    def of_config(cls, entry: ApiKeyConfig) -> KeySpec:
        return cls(
            name=entry.name, models=entry.models, adapters=entry.adapters, rpm=entry.rpm,
            tpm=entry.tpm, user_rpm=entry.user_rpm, user_tpm=entry.user_tpm,
            tenant=entry.tenant, priority=entry.priority,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key without its secret: what the admin API lists and Redis stores."""

    id: str
    spec: KeySpec
    source: Literal["config", "admin"]
    created: int | None = None  # unix seconds; None for config keys
    revoked: int | None = None
    rotated: int | None = None

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {
            "id": self.id, "name": s.name, "tenant": s.tenant,
            "models": list(s.models) if s.models is not None else None,
            "adapters": list(s.adapters) if s.adapters is not None else None,
            "rpm": s.rpm, "tpm": s.tpm, "user_rpm": s.user_rpm, "user_tpm": s.user_tpm,
            "priority": s.priority, "created": self.created, "rotated": self.rotated,
            "revoked": self.revoked, "source": self.source,
        }  # fmt: skip

    def dumps(self) -> bytes:
        return orjson.dumps(self.describe())

    @classmethod
    def loads(cls, raw: bytes | str) -> KeyRecord:
        """Parse a stored record (raises ValueError/TypeError/KeyError when malformed)."""
        d = orjson.loads(raw)
        spec = KeySpec(
            name=d.get("name"), models=_tuple(d.get("models")), adapters=_tuple(d.get("adapters")),
            rpm=d.get("rpm"), tpm=d.get("tpm"), user_rpm=d.get("user_rpm"),
            user_tpm=d.get("user_tpm"), tenant=d.get("tenant"), priority=d.get("priority"),
        )  # fmt: skip
        return cls(id=str(d["id"]), spec=spec, source="admin", created=d.get("created"),
                   revoked=d.get("revoked"), rotated=d.get("rotated"))  # fmt: skip


def _tuple(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(v) for v in value)


def build_principal(key_id: str, spec: KeySpec, tenants: Mapping[str, TenantConfig]) -> Principal:
    """The Principal of a key: its own limits, its tenant's limits, priority from the key,
    else the tenant's, else 0 (a tenant missing from ``tenants`` has no limits)."""
    tenant = tenants.get(spec.tenant) if spec.tenant is not None else None
    priority = spec.priority if spec.priority is not None else tenant.priority if tenant else 0
    return Principal(
        key_id=key_id, name=spec.name, tenant=spec.tenant,
        models=frozenset(spec.models) if spec.models is not None else None,
        adapters=frozenset(spec.adapters) if spec.adapters is not None else None,
        rpm=spec.rpm, tpm=spec.tpm, user_rpm=spec.user_rpm, user_tpm=spec.user_tpm,
        tenant_rpm=tenant.rpm if tenant else None, tenant_tpm=tenant.tpm if tenant else None,
        priority=priority,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new secret and its record: the only time the key is ever returned."""

    key: str
    record: KeyRecord


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal


class KeyStore:
    """Config keys + admin-issued keys (see the module docstring); ``authenticate`` per request."""

    def __init__(
        self,
        settings: Settings,
        *,
        link: RedisLink | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tenants = dict(settings.tenants)
        self._link = link
        self._clock = clock
        self._refresh_s = settings.redis.keys_refresh_s
        self.enabled = bool(settings.api_keys) or settings.admin_key is not None
        self._admin = digest(settings.admin_key.get_secret_value()) if settings.admin_key else None
        self._config: dict[bytes, KeyRecord] = {}
        for entry in settings.api_keys:
            secret = entry.key if isinstance(entry, ApiKeyConfig) else entry
            d = digest(secret.get_secret_value())
            if d in self._config or d == self._admin:
                raise ValueError("api_keys lists a key twice, or admin_key is also a client key")
            spec = KeySpec.of_config(entry) if isinstance(entry, ApiKeyConfig) else KeySpec()
            # A config key's id is a short hash: stable across restarts and replicas.
            key_id = "cfg-" + hashlib.sha256(b"switchyard-key-id:" + d).hexdigest()[:12]
            self._config[d] = KeyRecord(id=key_id, spec=spec, source="config")
        self._admin_keys: dict[bytes, KeyRecord] = {}  # digest -> record (revoked kept)
        self._active: dict[bytes, _Entry] = {}
        self._version: int | None = None  # of the Redis hash last loaded
        self._stale = True
        self.failures = 0
        self.reloads = 0
        self._lock = asyncio.Lock()
        if link is not None:
            link.on_change(self._link_changed)
        self._rebuild()

    # -- the hot path -------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller's Principal; 401 for a missing, wrong or revoked key."""
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(authorization)
        if token is not None:
            d = digest(token)
            entry = self._active.get(d)
            if entry is not None and hmac.compare_digest(entry.digest, d):
                return entry.principal
        self.failures += 1
        raise Unauthorized(_NO_KEY)

    def check_admin(self, authorization: str | None) -> None:
        """The admin API's check: the admin key only (401 missing/wrong, 403 a client key).
        Without ``admin_key`` the admin API is open only while authentication is off."""
        if self._admin is None:
            if self.enabled:
                raise PermissionDenied(
                    "the admin API is closed because client API keys are configured but "
                    "admin_key is not; set admin_key (SWITCHYARD_ADMIN_KEY) to use it"
                )
            return
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("the admin API needs 'Authorization: Bearer <admin_key>'")
        d = digest(token)
        if hmac.compare_digest(d, self._admin):
            return
        if d in self._active:
            raise PermissionDenied("the admin API needs the admin key, not a client key")
        raise Unauthorized("Incorrect admin key; send 'Authorization: Bearer <admin_key>'.")

    # -- the admin API ------------------------------------------------------------------

    def records(self) -> list[KeyRecord]:
        """Every key (config first, then admin keys by creation), without secrets."""
        admin = sorted(self._admin_keys.values(), key=lambda r: (r.created or 0, r.id))
        return [*self._config.values(), *admin]

    async def list_keys(self) -> list[KeyRecord]:
        """:meth:`records` after a fresh load from Redis (the last loaded keys if it is down)."""
        await self.refresh(force=True)
        return self.records()

    async def create(self, spec: KeySpec) -> IssuedKey:
        """Issue a key (400 while authentication is off or for an unknown tenant)."""
        if not self.enabled:
            raise ClientError(
                "authentication is off (no api_keys and no admin_key configured), so a key "
                "would not be checked; set admin_key to issue API keys"
            )
        if spec.tenant is not None and spec.tenant not in self._tenants:
            raise ClientError(f"unknown tenant {spec.tenant!r}; configured: "
                              f"{sorted(self._tenants)}", param="tenant")  # fmt: skip
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(id="key-" + secrets.token_hex(8), spec=spec, source="admin",
                           created=int(self._clock()))  # fmt: skip

        def change(keys: dict[bytes, KeyRecord]) -> KeyRecord:
            if len(keys) >= MAX_KEYS:
                raise ClientError(f"the key store is full ({MAX_KEYS} keys)")
            keys[digest(secret)] = record
            return record

        await self._change(change)
        log.info("api key %s created (name=%s tenant=%s)", record.id, spec.name, spec.tenant)
        return IssuedKey(key=secret, record=record)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke an admin-issued key (idempotent); 400 for a config key, 404 unknown id."""

        def change(keys: dict[bytes, KeyRecord]) -> KeyRecord:
            d, record = self._find(keys, key_id)
            if record.revoked is None:
                keys[d] = record = replace(record, revoked=int(self._clock()))
            return record

        record = await self._change(change)
        log.info("api key %s revoked", key_id)
        return record

    async def rotate(self, key_id: str) -> IssuedKey:
        """A new secret for the same id and settings; the old secret stops working."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)

        def change(keys: dict[bytes, KeyRecord]) -> KeyRecord:
            d, record = self._find(keys, key_id)
            if record.revoked is not None:
                raise ClientError(f"key {key_id!r} is revoked; create a new one", param="id")
            del keys[d]
            keys[digest(secret)] = record = replace(record, rotated=int(self._clock()))
            return record

        record = await self._change(change)
        log.info("api key %s rotated", key_id)
        return IssuedKey(key=secret, record=record)

    def _find(self, keys: dict[bytes, KeyRecord], key_id: str) -> tuple[bytes, KeyRecord]:
        if any(r.id == key_id for r in self._config.values()):
            raise ClientError(
                f"key {key_id!r} comes from the configuration (api_keys) and cannot be "
                "changed through the admin API; remove it from api_keys and restart",
                param="id",
            )
        for d, record in keys.items():
            if record.id == key_id:
                return d, record
        raise NotFound(f"no API key with id {key_id!r}", param="id")

    async def _change(self, change: Callable[[dict[bytes, KeyRecord]], KeyRecord]) -> KeyRecord:
        """Apply ``change`` to the admin keys: in memory without Redis; with Redis in one
        WATCH/MULTI transaction on the freshly read hash (then here at once)."""
        async with self._lock:
            if self._link is None:
                keys = dict(self._admin_keys)
                result = change(keys)
                self._admin_keys = keys
                self._rebuild()
                return result
            done = await self._link.call("keys_write", lambda r: self._transaction(r, change))
            if done is None:
                raise KeyStoreUnavailable(
                    "the shared key store (Redis) is unavailable; the key was not changed "
                    "(keys are never kept in one replica only); try again shortly"
                )
            if isinstance(done, str):
                raise KeyStoreUnavailable(done)
            version, keys, result = done
            self._install(version, keys)
            return result

    async def _transaction(
        self, r: Any, change: Callable[[dict[bytes, KeyRecord]], KeyRecord]
    ) -> tuple[int, dict[bytes, KeyRecord], KeyRecord] | str:
        hash_key, version_key = self._redis_keys()
        for _ in range(_TXN_TRIES):
            async with r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(version_key)
                    keys = self._parse(await pipe.hgetall(hash_key))
                    before = dict(keys)
                    result = change(keys)  # may raise a ClientError: nothing was written
                    pipe.multi()
                    for d in before.keys() - keys.keys():
                        pipe.hdel(hash_key, d.hex())
                    for d, record in keys.items():
                        if before.get(d) != record:
                            pipe.hset(hash_key, d.hex(), record.dumps())
                    pipe.incrby(version_key, secrets.randbelow(1 << 20) + 1)
                    *_, version = await pipe.execute()
                    return int(version), keys, result
                except WatchError:
                    continue  # another replica changed the keys meanwhile: read again
        return "the key store is being changed concurrently; try again"

    # -- keeping up with Redis ----------------------------------------------------------

    async def run(self) -> None:
        """Background: reload the shared keys when their version changes (needs a link)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s)

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload from Redis if the version changed (or ``force``); False when Redis is down
        (the keys loaded last stay in use)."""
        link = self._link
        if link is None:
            return True
        hash_key, version_key = self._redis_keys()
        if not (force or self._stale):
            version = await link.call("keys_version", lambda r: _version(r, version_key))
            if version is None:
                return False
            if version == self._version:
                return True

        async def load(r: Any) -> tuple[int, dict[bytes, KeyRecord]]:
            async with r.pipeline(transaction=True) as pipe:
                pipe.get(version_key)
                # Not pipe.hgetall: redis-py 6.4's cluster MULTI hands its keys= argument to
                # the reply parser (TypeError); the raw command parses the same everywhere.
                pipe.execute_command("HGETALL", hash_key)
                raw_version, raw = await pipe.execute()
            return int(raw_version or 0), self._parse(raw)

        async with self._lock:
            loaded = await link.call("keys_load", load)
            if loaded is None:
                return False
            self._install(*loaded)
        return True

    def _install(self, version: int, keys: dict[bytes, KeyRecord]) -> None:
        self._version = version
        self._stale = False
        self._admin_keys = keys
        self.reloads += 1
        self._rebuild()

    def _link_changed(self, up: bool) -> None:
        if up:  # Redis may have restarted empty or missed changes: reload whatever the version
            self._stale = True

    def _redis_keys(self) -> tuple[str, str]:
        assert self._link is not None
        return self._link.key("keys"), self._link.key("keys", "version")

    @staticmethod
    def _parse(raw: Mapping[Any, Any]) -> dict[bytes, KeyRecord]:
        out: dict[bytes, KeyRecord] = {}
        for field, value in raw.items():
            try:
                name = field.decode() if isinstance(field, bytes) else str(field)
                out[bytes.fromhex(name)] = KeyRecord.loads(value)
            except (ValueError, TypeError, KeyError):
                log.warning("skipping a malformed API key record in Redis")
        return out

    def _rebuild(self) -> None:
        """Swap in a new digest -> Principal map (config keys, then active admin keys)."""
        active = {d: _Entry(d, build_principal(r.id, r.spec, self._tenants))
                  for d, r in self._config.items()}  # fmt: skip
        for d, record in self._admin_keys.items():
            if record.revoked is None and d not in active:
                active[d] = _Entry(d, build_principal(record.id, record.spec, self._tenants))
        self._active = active

    def counts(self) -> dict[str, int]:
        """Active keys by source (for metrics)."""
        admin = sum(1 for r in self._admin_keys.values() if r.revoked is None)
        return {"config": len(self._config), "admin": admin}


async def _version(r: Any, version_key: str) -> int:
    return int(await r.get(version_key) or 0)


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("switchyard_auth_keys", "gauge", "keys",
               (Label("source", values=("admin", "config")),)),
    MetricSpec("switchyard_auth_failures_total", "counter", "failures"),
    MetricSpec("switchyard_auth_key_reloads_total", "counter", "reloads"),
)  # fmt: skip


class KeysCollector(Collector):
    """``switchyard_auth_keys{source}`` (active keys) and ``switchyard_auth_failures_total``
    (requests refused for a missing or wrong key), read at scrape; no key ever in a label."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        keys = GaugeMetricFamily("switchyard_auth_keys", "Active API keys by source",
                                 labels=["source"])  # fmt: skip
        for source, n in sorted(self._store.counts().items()):
            keys.add_metric([source], n)
        yield keys
        yield CounterMetricFamily("switchyard_auth_failures",
                                  "Requests refused for a missing, wrong or revoked API key",
                                  value=self._store.failures)  # fmt: skip
        yield CounterMetricFamily("switchyard_auth_key_reloads",
                                  "Loads of the shared API keys from Redis",
                                  value=self._store.reloads)  # fmt: skip
