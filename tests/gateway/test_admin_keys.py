"""The auth matrix end to end: real gateways (in-thread, real sockets) in front of fake
engines, httpx and the real openai SDK as clients, a real redis-server shared by two gateways.

Engines: one serves ``alpha`` and its adapter ``alpha-lora``, one serves ``beta``. Keys: one
per tenant (acme: alpha, globex: beta), one for the base model without adapters, one plain
(everything), and the admin key.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr

from gateway.settings import ApiKeyConfig
from tests.gateway.conftest import StartEngines, StartGateway
from tests.gateway.servers import ServerThread, wait_until
from tests.redis_server import RedisServer

ACME = "sk-acme-" + secrets.token_urlsafe(16)  # alpha (and its adapters) only
GLOBEX = "sk-globex-" + secrets.token_urlsafe(16)  # beta only: "another tenant's key"
BASE_ONLY = "sk-base-" + secrets.token_urlsafe(16)  # alpha without adapters
EVERYTHING = "sk-all-" + secrets.token_urlsafe(16)  # a plain string: every model
ADMIN = "adm-" + secrets.token_urlsafe(16)
KEYS = {
    "api_keys": [
        ApiKeyConfig(key=SecretStr(ACME), name="acme", models=("alpha",), tenant="acme"),
        ApiKeyConfig(key=SecretStr(GLOBEX), models=("beta",), tenant="globex"),
        ApiKeyConfig(key=SecretStr(BASE_ONLY), models=("alpha",), adapters=()),
        EVERYTHING,
    ],
    "admin_key": ADMIN,
    "tenants": {"acme": {"rpm": 1000}, "globex": {}},
}
FAST_REDIS = {"keys_refresh_s": 0.05, "retry_s": 0.05}


def _engines(start_engines: StartEngines) -> list[str]:
    ((_, alpha),) = start_engines(1, models=["alpha"], adapters={"alpha-lora": "alpha"})
    ((_, beta),) = start_engines(1, models=["beta"])
    return [alpha.url, beta.url]


def _auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key is not None else {}


def _chat(client: httpx.Client, gw: ServerThread, key: str | None, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return client.post(f"{gw.url}/v1/chat/completions", json=body, headers=_auth(key))


def _code(resp: httpx.Response) -> tuple[int, str]:
    return resp.status_code, resp.json()["error"]["code"]


def _assert_same_404(
    denied: httpx.Response, unknown: httpx.Response, names: tuple[str, str]
) -> None:
    """A denied model's answer is an unknown model's, byte for byte but the name and request id
    (``names`` have equal lengths, so even content-length matches)."""
    assert denied.status_code == unknown.status_code == 404
    assert denied.text.replace(names[0], "<m>") == unknown.text.replace(names[1], "<m>")
    skip = {"x-request-id", "date"}
    assert {k: v for k, v in denied.headers.items() if k not in skip} == {
        k: v for k, v in unknown.headers.items() if k not in skip
    }


def test_proxied_auth_matrix(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    gw = start_gateway(_engines(start_engines), **KEYS)
    assert _code(_chat(client, gw, None, "alpha")) == (401, "invalid_api_key")
    assert _code(_chat(client, gw, "sk-wrong-" + secrets.token_urlsafe(8), "alpha")) == (
        401, "invalid_api_key")  # fmt: skip
    assert _code(_chat(client, gw, ADMIN, "alpha")) == (401, "invalid_api_key")  # not a client key
    for model in ("alpha", "alpha-lora", "beta"):
        assert _chat(client, gw, EVERYTHING, model).status_code == 200
    assert _chat(client, gw, ACME, "alpha").status_code == 200
    assert _chat(client, gw, ACME, "alpha-lora").status_code == 200
    assert _chat(client, gw, GLOBEX, "beta").status_code == 200
    assert _chat(client, gw, BASE_ONLY, "alpha").status_code == 200
    # Denied models look exactly like models that do not exist.
    for key, denied, unknown in [
        (ACME, "beta", "zeta"),  # another tenant's model
        (GLOBEX, "alpha", "gamma"),
        (GLOBEX, "alpha-lora", "gamma-lora"),
        (BASE_ONLY, "alpha-lora", "gamma-lora"),  # an adapter the key may not use
    ]:
        denied_resp = _chat(client, gw, key, denied)
        assert _code(denied_resp) == (404, "model_not_found")
        _assert_same_404(denied_resp, _chat(client, gw, key, unknown), (denied, unknown))
        shown = client.get(f"{gw.url}/v1/models/{denied}", headers=_auth(key))
        hidden = client.get(f"{gw.url}/v1/models/{unknown}", headers=_auth(key))
        _assert_same_404(shown, hidden, (denied, unknown))


@pytest.mark.parametrize(
    ("key", "visible"),
    [
        (EVERYTHING, ["alpha", "alpha-lora", "beta"]),
        (ACME, ["alpha", "alpha-lora"]),
        (GLOBEX, ["beta"]),
        (BASE_ONLY, ["alpha"]),
    ],
)
def test_models_listed_per_key_with_the_sdk(
    start_engines: StartEngines, start_gateway: StartGateway, key: str, visible: list[str]
) -> None:
    gw = start_gateway(_engines(start_engines), **KEYS)
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0) as sdk:
        assert sorted(m.id for m in sdk.models.list()) == visible
        for model in ("alpha", "alpha-lora", "beta"):
            if model in visible:
                assert sdk.models.retrieve(model).id == model
                continue
            with pytest.raises(openai.NotFoundError) as err:
                sdk.models.retrieve(model)
            assert err.value.code == "model_not_found"
            with pytest.raises(openai.NotFoundError) as err:
                sdk.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "x"}]
                )
            assert err.value.code == "model_not_found"


def test_sdk_gets_401_for_missing_and_wrong_keys(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    gw = start_gateway(_engines(start_engines), **KEYS)
    assert _code(client.get(f"{gw.url}/v1/models")) == (401, "invalid_api_key")
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-nope-nope", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as err:
            sdk.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}])
        assert err.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()


def test_admin_api_takes_the_admin_key_only(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    urls = _engines(start_engines)
    gw = start_gateway(urls, **KEYS)
    for path in ("/admin/engines", "/admin/keys"):
        assert _code(client.get(f"{gw.url}{path}")) == (401, "invalid_api_key")
        assert _code(client.get(f"{gw.url}{path}", headers=_auth("adm-wrong-wrong"))) == (
            401, "invalid_api_key")  # fmt: skip
        denied = client.get(f"{gw.url}{path}", headers=_auth(ACME))
        assert _code(denied) == (403, "permission_denied")
        assert "admin key" in denied.json()["error"]["message"]
        assert client.get(f"{gw.url}{path}", headers=_auth(ADMIN)).status_code == 200
    created = client.post(f"{gw.url}/admin/keys", headers=_auth(ACME), json={})
    assert created.status_code == 403  # checked before the body is even read

    closed = start_gateway(urls, api_keys=[EVERYTHING])  # client keys, no admin_key
    refused = client.get(f"{closed.url}/admin/engines", headers=_auth(EVERYTHING))
    assert _code(refused) == (403, "permission_denied")
    assert "admin_key" in refused.json()["error"]["message"]
    assert client.get(f"{start_gateway(urls).url}/admin/keys").json()["keys"] == []  # local
    off = start_gateway(urls, admin_enabled=False, **KEYS)
    assert client.get(f"{off.url}/admin/keys", headers=_auth(ADMIN)).status_code == 404


def test_key_lifecycle_through_the_admin_api(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    gw = start_gateway(_engines(start_engines), **KEYS)
    admin = _auth(ADMIN)
    spec = {"name": "ci", "models": ["alpha"], "rpm": 60, "tenant": "acme", "priority": 2}
    created = client.post(f"{gw.url}/admin/keys", headers=admin, json=spec)
    assert created.status_code == 201
    issued = created.json()
    key, key_id = issued["key"], issued["id"]
    assert key.startswith("sk-sy-") and issued["source"] == "admin" and issued["created"] > 0
    assert {k: issued[k] for k in spec} == spec
    assert _chat(client, gw, key, "alpha").status_code == 200
    assert _code(_chat(client, gw, key, "beta")) == (404, "model_not_found")

    listed = client.get(f"{gw.url}/admin/keys", headers=admin).json()["keys"]
    assert [k["source"] for k in listed] == ["config"] * 4 + ["admin"]
    assert listed[-1]["id"] == key_id and "key" not in listed[-1]
    text = client.get(f"{gw.url}/admin/keys", headers=admin).text
    assert all(secret not in text for secret in (key, ACME, GLOBEX, BASE_ONLY, EVERYTHING))

    rotated = client.post(f"{gw.url}/admin/keys/{key_id}/rotate", headers=admin).json()
    assert rotated["id"] == key_id and rotated["key"] != key and rotated["rotated"] is not None
    assert _code(_chat(client, gw, key, "alpha")) == (401, "invalid_api_key")
    assert _chat(client, gw, rotated["key"], "alpha").status_code == 200

    revoked = client.delete(f"{gw.url}/admin/keys/{key_id}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is not None
    assert _code(_chat(client, gw, rotated["key"], "alpha")) == (401, "invalid_api_key")
    assert client.get(f"{gw.url}/admin/keys", headers=admin).json()["keys"][-1]["revoked"]

    config_id = listed[0]["id"]
    refused = client.delete(f"{gw.url}/admin/keys/{config_id}", headers=admin)
    assert refused.status_code == 400 and "api_keys" in refused.json()["error"]["message"]
    assert client.post(f"{gw.url}/admin/keys/{config_id}/rotate", headers=admin).status_code == 400
    assert _chat(client, gw, ACME, "alpha").status_code == 200  # still works
    assert _code(client.delete(f"{gw.url}/admin/keys/key-nope", headers=admin)) == (
        404, "not_found")  # fmt: skip

    def post(body: Any) -> httpx.Response:
        return client.post(f"{gw.url}/admin/keys", headers=admin, content=body)

    bad = post(b'{"rpm": 0}')
    assert _code(bad) == (400, "invalid_value") and bad.json()["error"]["param"] == "rpm"
    assert _code(post(b'{"key": "sk-mine-mine"}')) == (400, "invalid_value")  # never chosen
    assert _code(post(b'{"tenant": "nobody"}'))[0] == 400
    assert _code(post(b"{nope")) == (400, "invalid_json")
    assert post(b"").status_code == 201  # every field optional: a key for everything


def test_keys_shared_by_two_gateways_through_redis(
    start_engines: StartEngines,
    start_gateway: StartGateway,
    client: httpx.Client,
    redis_server: RedisServer,
) -> None:
    urls = _engines(start_engines)
    shared = {**KEYS, "redis_url": redis_server.url, "redis": FAST_REDIS}
    a, b = start_gateway(urls, **shared), start_gateway(urls, **shared)
    admin = _auth(ADMIN)
    issued = client.post(f"{a.url}/admin/keys", headers=admin, json={"models": ["beta"]}).json()
    key, key_id = issued["key"], issued["id"]
    assert _chat(client, a, key, "beta").status_code == 200  # the writer: at once
    assert wait_until(lambda: _chat(client, b, key, "beta").status_code == 200)
    assert _code(_chat(client, b, key, "alpha")) == (404, "model_not_found")
    assert key_id in [
        k["id"] for k in client.get(f"{b.url}/admin/keys", headers=admin).json()["keys"]
    ]

    rotated = client.post(f"{b.url}/admin/keys/{key_id}/rotate", headers=admin).json()["key"]
    assert wait_until(lambda: _chat(client, a, rotated, "beta").status_code == 200)
    assert _chat(client, a, key, "beta").status_code == 401

    assert client.delete(f"{a.url}/admin/keys/{key_id}", headers=admin).status_code == 200
    assert _chat(client, a, rotated, "beta").status_code == 401
    assert wait_until(lambda: _chat(client, b, rotated, "beta").status_code == 401)

    # Redis down: keys already loaded keep working, changes are refused, not kept locally.
    survivor = client.post(f"{a.url}/admin/keys", headers=admin, json={}).json()["key"]
    assert wait_until(lambda: _chat(client, b, survivor, "alpha").status_code == 200)
    redis_server.stop()
    refused = client.post(f"{a.url}/admin/keys", headers=admin, json={})
    assert _code(refused) == (503, "key_store_unavailable") and "retry-after" in refused.headers
    for gw in (a, b):
        assert _chat(client, gw, survivor, "alpha").status_code == 200
        assert _chat(client, gw, ACME, "alpha").status_code == 200
    redis_server.start()  # back empty (no persistence): both gateways recover, no restart

    def create() -> httpx.Response:
        return client.post(f"{a.url}/admin/keys", headers=admin, json={})

    assert wait_until(lambda: create().status_code == 201)
    again = create().json()["key"]
    assert wait_until(lambda: _chat(client, b, again, "alpha").status_code == 200)


def test_no_secret_in_logs_metrics_or_error_bodies(
    start_engines: StartEngines,
    start_gateway: StartGateway,
    client: httpx.Client,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk-sy-" + secrets.token_urlsafe(32)
    gw = start_gateway(_engines(start_engines), server={"access_log": True},
                       redis_url=redis_server.url, redis=FAST_REDIS, **KEYS)  # fmt: skip
    admin = _auth(ADMIN)
    issued = client.post(f"{gw.url}/admin/keys", headers=admin, json={"name": "temp"}).json()
    rotated = client.post(f"{gw.url}/admin/keys/{issued['id']}/rotate", headers=admin).json()
    client.delete(f"{gw.url}/admin/keys/{issued['id']}", headers=admin)
    secrets_used = [ACME, GLOBEX, BASE_ONLY, EVERYTHING, ADMIN, wrong, issued["key"],
                    rotated["key"]]  # fmt: skip

    answers: list[httpx.Response] = []
    for key in secrets_used:
        for header in (f"Bearer {key}", f"Basic {key}", key, f"Bearer {key} trailing"):
            headers = {"authorization": header}
            answers.append(client.post(f"{gw.url}/v1/chat/completions", headers=headers,
                                       json={"model": "beta", "messages": []}))  # fmt: skip
            answers.append(client.get(f"{gw.url}/v1/models/beta", headers=headers))
            answers.append(client.get(f"{gw.url}/admin/keys/x", headers=headers))
            answers.append(client.get(f"{gw.url}/admin/engines", headers=headers))
    errors = [r for r in answers if r.status_code >= 400]
    assert {r.status_code for r in errors} >= {401, 403, 404, 405}
    metrics = client.get(f"{gw.url}/metrics").text
    assert "switchyard_auth_failures_total" in metrics
    assert "switchyard_redis_healthy_ratio 1.0" in metrics

    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert f"api key {issued['id']} rotated" in logged  # the gateway's logs were captured
    assert "/v1/chat/completions 401" in logged  # ... including the access log
    for secret in secrets_used:
        assert secret not in logged
        assert secret not in metrics
        assert all(secret not in r.text for r in errors)
        assert all(secret not in str(r.headers) for r in answers)
