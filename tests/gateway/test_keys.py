"""gateway.keys: the pure parts as tables, the in-memory store, and the Redis-backed store
against a real redis-server (two stores sharing it stand for two replicas)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.errors import ClientError, NotFound, PermissionDenied, Unauthorized
from gateway.keys import (
    KEY_PREFIX,
    KeyRecord,
    KeySpec,
    KeyStore,
    KeyStoreUnavailable,
    bearer_token,
    build_principal,
)
from gateway.principal import ANONYMOUS, Principal
from gateway.redislink import RedisLink
from gateway.settings import ApiKeyConfig, Settings, TenantConfig
from tests.redis_server import RedisServer

PLAIN = "sk-plain-0123456789"
ALPHA = "sk-alpha-0123456789"
ADMIN = "admin-0123456789abcdef"


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        ("  Bearer abc", "abc"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("abc", None),
        ("Token abc", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


TENANTS = {"acme": TenantConfig(rpm=100, tpm=1000, priority=5), "free": TenantConfig()}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (KeySpec(), Principal(key_id="k")),
        (KeySpec(name="ci", models=("m",), adapters=(), rpm=1, tpm=2, user_rpm=3, user_tpm=4),
         Principal(key_id="k", name="ci", models=frozenset({"m"}), adapters=frozenset(), rpm=1,
                   tpm=2, user_rpm=3, user_tpm=4)),
        (KeySpec(tenant="acme"),
         Principal(key_id="k", tenant="acme", tenant_rpm=100, tenant_tpm=1000, priority=5)),
        (KeySpec(tenant="acme", priority=-1),
         Principal(key_id="k", tenant="acme", tenant_rpm=100, tenant_tpm=1000, priority=-1)),
        (KeySpec(tenant="free"), Principal(key_id="k", tenant="free")),
        (KeySpec(tenant="nobody", priority=2), Principal(key_id="k", tenant="nobody", priority=2)),
    ],
)  # fmt: skip
def test_build_principal(spec: KeySpec, expected: Principal) -> None:
    assert build_principal("k", spec, TENANTS) == expected


@pytest.mark.parametrize(
    ("models", "adapters", "model", "adapter", "allowed"),
    [
        (None, None, "m", None, True),
        (None, None, "m", "lora", True),
        (("m",), None, "m", None, True),
        (("m",), None, "m", "lora", True),
        (("m",), None, "other", None, False),
        (("m",), (), "m", "lora", False),  # the base model only: no adapters at all
        (("m",), ("lora",), "m", "lora", True),
        (("m",), ("lora",), "m", "lora2", False),
        (("lora",), None, "m", "lora", True),  # naming an adapter grants the adapter only
        (("lora",), None, "m", None, False),
        (None, ("lora",), "m", "lora2", False),
    ],
)
def test_principal_allows(
    models: tuple[str, ...] | None,
    adapters: tuple[str, ...] | None,
    model: str,
    adapter: str | None,
    allowed: bool,
) -> None:
    spec = KeySpec(models=models, adapters=adapters)
    assert build_principal("k", spec, {}).allows(model, adapter) is allowed


def _settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {
        "api_keys": [PLAIN, ApiKeyConfig(key=SecretStr(ALPHA), name="alpha", models=("alpha",),
                                         tenant="acme", rpm=7)],
        "admin_key": ADMIN,
        "tenants": {"acme": {"rpm": 100}},
    }  # fmt: skip
    return Settings(**{**base, **kw})


def test_without_keys_everyone_is_anonymous() -> None:
    store = KeyStore(Settings(), link=None)
    assert not store.enabled
    for header in (None, "Bearer whatever", "garbage"):
        assert store.authenticate(header) is ANONYMOUS
    store.check_admin(None)  # the local default: the admin API is open


def test_config_keys() -> None:
    store = KeyStore(_settings(), link=None)
    plain = store.authenticate(f"Bearer {PLAIN}")
    assert plain.models is None and not plain.limited
    alpha = store.authenticate(f"bearer {ALPHA}")
    assert (alpha.name, alpha.tenant, alpha.rpm, alpha.tenant_rpm) == ("alpha", "acme", 7, 100)
    assert alpha.allows("alpha", None) and not alpha.allows("beta", None)
    for header in (None, "Bearer nope-nope-nope", f"Basic {PLAIN}", f"Bearer {PLAIN}x", ADMIN,
                   f"Bearer {ADMIN}"):  # fmt: skip
        with pytest.raises(Unauthorized) as err:
            store.authenticate(header)
        assert PLAIN not in str(err.value) and ADMIN not in str(err.value)
    assert store.failures == 6
    # Ids: stable across stores (replicas), distinct, and not the key or its plain hash.
    ids = [r.id for r in store.records()]
    assert ids == [r.id for r in KeyStore(_settings(), link=None).records()]
    assert len(set(ids)) == 2
    for record, secret in zip(store.records(), (PLAIN, ALPHA), strict=True):
        text = record.dumps().decode()
        assert secret not in text and hashlib.sha256(secret.encode()).hexdigest()[:12] not in text
        assert record.source == "config" and record.created is None


@pytest.mark.parametrize(
    ("overrides", "header", "outcome"),
    [
        ({}, f"Bearer {ADMIN}", None),
        ({}, None, Unauthorized),
        ({}, "Bearer wrong-wrong", Unauthorized),
        ({}, f"Bearer {PLAIN}", PermissionDenied),  # a client key on the admin API
        ({"api_keys": []}, f"Bearer {ADMIN}", None),  # admin key alone turns auth on
        ({"api_keys": []}, None, Unauthorized),
        ({"admin_key": None}, f"Bearer {PLAIN}", PermissionDenied),  # keys, no admin key
        ({"admin_key": None}, None, PermissionDenied),
        ({"admin_key": None, "api_keys": []}, None, None),  # the local default: open
    ],
)
def test_check_admin(overrides: dict[str, Any], header: str | None, outcome: type | None) -> None:
    store = KeyStore(_settings(**overrides), link=None)
    if outcome is None:
        store.check_admin(header)
    else:
        with pytest.raises(outcome) as err:
            store.check_admin(header)
        assert ADMIN not in str(err.value) and PLAIN not in str(err.value)


def test_bad_key_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        KeyStore(_settings(api_keys=[PLAIN, PLAIN]), link=None)
    with pytest.raises(ValueError, match="admin_key"):
        KeyStore(_settings(api_keys=[ADMIN]), link=None)


@pytest.mark.anyio
async def test_in_memory_admin_keys() -> None:
    now = [1000.0]
    store = KeyStore(_settings(), link=None, clock=lambda: now[0])
    issued = await store.create(KeySpec(name="ci", models=("alpha",), tenant="acme"))
    assert issued.key.startswith(KEY_PREFIX) and len(issued.key) > 40
    who = store.authenticate(f"Bearer {issued.key}")
    assert (who.key_id, who.tenant_rpm) == (issued.record.id, 100)
    assert issued.key not in issued.record.dumps().decode()
    assert [r.source for r in await store.list_keys()] == ["config", "config", "admin"]

    now[0] = 2000.0
    rotated = await store.rotate(issued.record.id)
    assert rotated.key != issued.key and rotated.record.id == issued.record.id
    assert rotated.record.rotated == 2000 and rotated.record.created == 1000
    with pytest.raises(Unauthorized):
        store.authenticate(f"Bearer {issued.key}")
    assert store.authenticate(f"Bearer {rotated.key}").key_id == issued.record.id

    revoked = await store.revoke(issued.record.id)
    assert revoked.revoked == 2000
    with pytest.raises(Unauthorized):
        store.authenticate(f"Bearer {rotated.key}")
    assert (await store.revoke(issued.record.id)).revoked == 2000  # idempotent
    assert store.counts() == {"config": 2, "admin": 0}
    with pytest.raises(ClientError, match="revoked"):
        await store.rotate(issued.record.id)


@pytest.mark.anyio
async def test_admin_changes_refused() -> None:
    store = KeyStore(_settings(), link=None)
    config_id = store.records()[0].id
    for op in (store.revoke, store.rotate):
        with pytest.raises(ClientError, match="configuration") as err:
            await op(config_id)
        assert err.value.status == 400
        with pytest.raises(NotFound):
            await op("key-missing")
    with pytest.raises(ClientError, match="unknown tenant"):
        await store.create(KeySpec(tenant="nobody"))
    with pytest.raises(ClientError, match="authentication is off"):
        await KeyStore(Settings(), link=None).create(KeySpec())


def _link(redis: RedisServer, **settings: Any) -> RedisLink:
    return RedisLink.from_url(redis.url, Settings(redis=settings).redis)


@pytest.mark.anyio
async def test_redis_store_shared_between_replicas(redis_server: RedisServer) -> None:
    link_a, link_b = _link(redis_server), _link(redis_server)
    a = KeyStore(_settings(), link=link_a)
    b = KeyStore(_settings(), link=link_b)
    try:
        assert await a.refresh() and await b.refresh()
        issued = await a.create(KeySpec(name="shared", rpm=5))
        a.authenticate(f"Bearer {issued.key}")  # the writer applies it at once
        with pytest.raises(Unauthorized):
            b.authenticate(f"Bearer {issued.key}")  # the other replica: after its refresh
        assert await b.refresh()
        assert b.authenticate(f"Bearer {issued.key}").rpm == 5

        # Stored hashed: field = sha256 hex, value = the record without the secret.
        raw = await link_a.client.hgetall(link_a.key("keys"))
        assert list(raw) == [hashlib.sha256(issued.key.encode()).hexdigest().encode()]
        assert issued.key.encode() not in b"".join(raw.values())
        assert int(await link_a.client.get(link_a.key("keys", "version"))) > 0

        await b.revoke(issued.record.id)  # a change made on the other replica
        assert await a.refresh()
        with pytest.raises(Unauthorized):
            a.authenticate(f"Bearer {issued.key}")
        assert [r.revoked is not None for r in await a.list_keys() if r.source == "admin"] == [True]

        # A malformed record is skipped, the rest still load.
        await link_a.client.hset(link_a.key("keys"), "zz", b"{")
        await link_a.client.incr(link_a.key("keys", "version"))
        kept = await a.create(KeySpec())
        assert await b.refresh()
        assert b.authenticate(f"Bearer {kept.key}").key_id == kept.record.id
    finally:
        await link_a.aclose()
        await link_b.aclose()


@pytest.mark.anyio
async def test_redis_down_keeps_keys_and_refuses_changes(redis_server: RedisServer) -> None:
    link = _link(redis_server, retry_s=0.05)
    store = KeyStore(_settings(), link=link)
    try:
        issued = await store.create(KeySpec())
        redis_server.stop()
        assert not await store.refresh(force=True)
        assert store.authenticate(f"Bearer {issued.key}").key_id == issued.record.id
        assert store.authenticate(f"Bearer {PLAIN}").models is None
        with pytest.raises(KeyStoreUnavailable) as err:
            await store.create(KeySpec())
        assert err.value.status == 503 and "Redis" in err.value.message
        with pytest.raises(KeyStoreUnavailable):
            await store.revoke(issued.record.id)
        assert store.authenticate(f"Bearer {issued.key}")  # the refused revoke changed nothing

        redis_server.start()  # back, but empty (no persistence): Redis is the source of truth
        assert await link.probe()
        assert await store.refresh()
        with pytest.raises(Unauthorized):
            store.authenticate(f"Bearer {issued.key}")
        fresh = await store.create(KeySpec())
        assert store.authenticate(f"Bearer {fresh.key}").key_id == fresh.record.id
    finally:
        await link.aclose()


def test_record_round_trip() -> None:
    record = KeyRecord(id="key-1", spec=KeySpec(name="n", models=("a",), adapters=(), rpm=1,
                       tenant="t", priority=3), source="admin", created=5, rotated=6)  # fmt: skip
    assert KeyRecord.loads(record.dumps()) == record
