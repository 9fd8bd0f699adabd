"""Every gateway-made error is the OpenAI envelope with the right status and an x-request-id,
and the gateway keeps serving after each."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.gateway.conftest import StartEngines, StartGateway
from tests.gateway.servers import wait_until

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def _check_envelope(resp: httpx.Response, status: int, code: str | None) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-request-id"]
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize(
    ("content", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (b'{"messages": []}', "invalid_value", "model"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', "invalid_value", "model"),
        (b'{"model": "fake-model"}', "invalid_value", "messages"),
        (b'{"model": "fake-model", "messages": "hi"}', "invalid_value", "messages"),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], '
            b'"stream": "yes"}',
            "invalid_value",
            "stream",
        ),
        (
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": "ten"}',
            "invalid_value",
            "max_tokens",
        ),
    ],
)
def test_bad_requests_get_400_envelopes(
    start_engines: StartEngines,
    start_gateway: StartGateway,
    client: httpx.Client,
    content: bytes,
    code: str,
    param: str | None,
) -> None:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    resp = client.post(f"{gw.url}/v1/chat/completions", content=content,
                       headers={"content-type": "application/json"})  # fmt: skip
    err = _check_envelope(resp, 400, code)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert engine.requests == 0  # never reached the engine
    assert client.post(f"{gw.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_unknown_model_is_404_model_not_found(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    resp = client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "nope"})
    err = _check_envelope(resp, 404, "model_not_found")
    assert "`nope`" in str(err["message"]) and err["param"] == "model"
    assert client.get(f"{gw.url}/v1/models/nope").status_code == 404


def test_ten_megabyte_body_is_413_and_gateway_keeps_serving(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    big = (
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        + (b"x" * (10 * 1024 * 1024))
        + b'"}]}'
    )
    resp = client.post(f"{gw.url}/v1/chat/completions", content=big,
                       headers={"content-type": "application/json"})  # fmt: skip
    _check_envelope(resp, 413, "request_too_large")
    assert engine.requests == 0
    assert client.post(f"{gw.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_chunked_body_over_limit_is_413(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url], server={"max_body_bytes": 1000})

    def chunks() -> object:
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    resp = client.post(f"{gw.url}/v1/chat/completions", content=chunks())  # type: ignore[arg-type]
    _check_envelope(resp, 413, "request_too_large")


def test_all_engines_down_gives_503_envelope(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    gw = start_gateway([srv.url for _, srv in engines])
    for _, srv in engines:
        srv.stop()
    assert wait_until(lambda: client.get(f"{gw.url}/ready").json()["healthy_engines"] == 0)
    resp = client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
    err = _check_envelope(resp, 503, "no_healthy_endpoint")
    assert err["type"] == "service_unavailable_error"
    assert resp.headers["retry-after"] == "1"
    # The gateway stays ready (in the Service, answering these 503s), saying why in the body.
    ready = client.get(f"{gw.url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert {e["health"] for e in ready.json()["engines"]} == {"unhealthy"}


def test_engines_unreachable_before_health_notices_gives_502(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    engines = start_engines(2)
    gw = start_gateway([srv.url for _, srv in engines], health={"interval_s": 60})
    for _, srv in engines:
        srv.stop()
    resp = client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
    _check_envelope(resp, 502, "upstream_unavailable")


def test_upstream_read_timeout_is_504(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url], proxy={"read_timeout_s": 0.3})
    resp = client.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "fake": {"hang": True}})
    _check_envelope(resp, 504, "upstream_timeout")


def test_api_key_required_when_configured(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((engine, srv),) = start_engines(1)
    gw = start_gateway([srv.url], api_keys=["sk-test"])
    resp = client.post(f"{gw.url}/v1/chat/completions", json=CHAT)
    err = _check_envelope(resp, 401, "invalid_api_key")
    assert err["type"] == "invalid_request_error"
    bad = client.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                      headers={"authorization": "Bearer wrong"})  # fmt: skip
    assert bad.status_code == 401
    ok = client.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                     headers={"authorization": "Bearer sk-test"})  # fmt: skip
    assert ok.status_code == 200
    assert "authorization" not in engine.headers[-1]  # the gateway key is not leaked upstream


def test_unknown_route_and_policy(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    _check_envelope(client.get(f"{gw.url}/v1/nothing"), 404, "not_found")
    resp = client.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                       headers={"x-switchyard-routing": "astrology"})  # fmt: skip
    err = _check_envelope(resp, 400, "invalid_value")
    assert err["param"] == "x-switchyard-routing"


def test_garbage_on_the_socket_does_not_hurt_the_gateway(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        sock.recv(1024)
    assert client.post(f"{gw.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_engine_api_key_is_sent_upstream_and_client_key_is_not(
    start_engines: StartEngines, start_gateway: StartGateway, client: httpx.Client
) -> None:
    from pydantic import SecretStr

    from gateway.settings import EngineConfig

    ((engine, srv),) = start_engines(1)
    engine_config = EngineConfig(url=srv.url, api_key=SecretStr("engine-key"))
    gw = start_gateway(
        [], engines=[engine_config], api_keys=["sk-client"], admin_key="sk-admin-key"
    )
    ok = client.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                     headers={"authorization": "Bearer sk-client"})  # fmt: skip
    assert ok.status_code == 200
    assert engine.headers[-1]["authorization"] == "Bearer engine-key"
    probes = client.get(f"{gw.url}/admin/engines", headers={"authorization": "Bearer sk-admin-key"})
    assert probes.status_code == 200 and probes.json()["engines"]
    assert "engine-key" not in probes.text
