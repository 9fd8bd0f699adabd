"""Structured logs: one access line per proxied request, the request id on every line logged
within a request, and no secret in any line (real gateway and fake engines on loopback)."""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import Iterator

import httpx
import orjson
import pytest
from pydantic import SecretStr

from gateway.accesslog import ACCESS_LOGGER, AccessLog
from gateway.context import reset_request_id, set_request_id
from gateway.exchange import FinishedRequest, request_tokens
from gateway.logs import MASK, JsonFormatter, TextFormatter, make_handler, redact
from gateway.parsing import Kind
from gateway.services import Services
from gateway.settings import ApiKeyConfig
from tests.gateway.conftest import StartEngines, StartGateway, gateway_settings
from tests.gateway.servers import wait_until

KEY = "sk-sy-" + secrets.token_urlsafe(24)
WRONG = "sk-sy-" + secrets.token_urlsafe(24)
REDIS_PASSWORD = "hunter2-" + secrets.token_hex(8)


class Captured:
    """What the root logger wrote, as JSON lines, through the production handler."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.text.splitlines() if line.strip()]

    def access(self) -> list[dict[str, object]]:
        return [line for line in self.lines() if line["logger"] == ACCESS_LOGGER]


@pytest.fixture
def logs() -> Iterator[Captured]:
    captured = Captured()
    handler = make_handler("json", captured.stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# -- redaction and formatters ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "secret"),
    [
        (f"Authorization: Bearer {KEY}", KEY),
        (f"authorization=bearer {WRONG}", WRONG),
        ("headers {'authorization': 'Basic dXNlcjpwYXNz'}", "dXNlcjpwYXNz"),
        (f"calling with key {KEY} now", KEY[3:]),
        ("sk-proj-0123456789abcdefXYZ in a message", "0123456789abcdefXYZ"),
        (f"redis://default:{REDIS_PASSWORD}@10.0.0.1:6379/0 down", REDIS_PASSWORD),
        (f"rediss://:{REDIS_PASSWORD}@redis:6380 down", REDIS_PASSWORD),
        (f"redis+sentinel://u:{REDIS_PASSWORD}@s1,s2/mymaster/0", REDIS_PASSWORD),
        (f'{{"api_key": "{REDIS_PASSWORD}"}}', REDIS_PASSWORD),
        (f"x-api-key: {REDIS_PASSWORD}", REDIS_PASSWORD),
        (f"password={REDIS_PASSWORD}&db=0", REDIS_PASSWORD),
        (f'admin_key="{REDIS_PASSWORD}"', REDIS_PASSWORD),
    ],
)
def test_redact_masks_every_secret_shape(line: str, secret: str) -> None:
    out = redact(line)
    assert secret not in out and MASK in out


@pytest.mark.parametrize(
    "line",
    [
        "POST /v1/chat/completions 200 prompt_tokens=12 completion_tokens=4 key_id=k_1a2b3c4d",
        "engine http://127.0.0.1:8000 failed: connection refused",
        "redis redis://10.0.0.1:6379/0 is back; shared state resumes",
        "model=sk-sy-",  # too short to be a key
    ],
)
def test_redact_keeps_ordinary_lines(line: str) -> None:
    assert redact(line) == line


def _record(msg: str, *args: object, access: dict[str, object] | None = None) -> logging.LogRecord:
    record = logging.LogRecord("gateway.x", logging.WARNING, __file__, 1, msg, args, None)
    if access is not None:
        record.access = access
    return record


def test_json_lines_carry_the_request_id_the_access_fields_and_no_secret() -> None:
    stream = io.StringIO()
    handler = make_handler("json", stream)
    token = set_request_id("req_abc")
    try:
        handler.handle(_record("engine %s said %s", "e1", f"Bearer {KEY}",
                               access={"status": 200, "key_id": "k_1"}))  # fmt: skip
    finally:
        reset_request_id(token)
    handler.handle(_record("outside a request"))
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["request_id"] == "req_abc" and first["level"] == "WARNING"
    assert first["status"] == 200 and first["key_id"] == "k_1"
    assert first["message"] == f"engine e1 said Bearer {MASK}"
    assert second["request_id"] == "-" and "status" not in second
    assert KEY not in stream.getvalue()


def test_text_lines_append_access_fields_and_redact() -> None:
    record = _record("url %s", f"redis://:{REDIS_PASSWORD}@r:6379",
                     access={"status": 503, "engine": None, "model": "m"})  # fmt: skip
    line = TextFormatter().format(record)
    assert line.endswith(" status=503 model=m") and "[-]" in line
    assert REDIS_PASSWORD not in line
    exc_line = JsonFormatter()
    try:
        raise RuntimeError(f"password={REDIS_PASSWORD}")
    except RuntimeError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    assert REDIS_PASSWORD not in exc_line.format(failed)


def test_tokens_prefer_the_engines_usage() -> None:
    base = FinishedRequest(request_id=None, endpoint_id="e1", model="m", adapter=None,
                           stream=True, status=200, outcome="ok", duration_s=1.0, ttft_s=0.1,
                           prompt_tokens_estimate=30, usage=None, streamed_events=7)  # fmt: skip
    assert request_tokens(base) == (30, 7)
    from dataclasses import replace

    used = replace(base, usage={"prompt_tokens": 28, "completion_tokens": 9})
    assert request_tokens(used) == (28, 9)
    assert request_tokens(replace(base, status=429)) == (0, 0)
    assert request_tokens(replace(base, endpoint_id=None)) == (0, 0)


def test_access_log_is_silent_below_info() -> None:
    logger = logging.getLogger("tests.silent.access")
    logger.setLevel(logging.WARNING)
    stream = io.StringIO()
    logger.addHandler(make_handler("json", stream))
    try:
        access = AccessLog(logger)
        access.refused(kind=Kind.CHAT, status=401, error="Unauthorized", model=None,
                       key_id=None, duration_s=0.001)  # fmt: skip
    finally:
        logger.handlers.clear()
    assert stream.getvalue() == ""


# -- a real gateway ------------------------------------------------------------------------------
def test_one_access_line_per_request_with_its_fields_and_never_the_key(
    start_engines: StartEngines, start_gateway: StartGateway, logs: Captured
) -> None:
    (engine, srv), (bad, bad_srv) = start_engines(2, tokens=4)
    bad.status = 503  # fails every attempt: the proxy logs a warning, then retries on e0
    keys = [ApiKeyConfig(key=SecretStr(KEY), name="team-a")]
    engines = [{"url": srv.url, "id": "e0"}, {"url": bad_srv.url, "id": "e1"}]
    gw = start_gateway([srv.url, bad_srv.url], engines=engines, api_keys=keys,
                       server={"access_log": True},
                       routing={"policy": "round-robin"})  # fmt: skip
    auth = {"authorization": f"Bearer {KEY}"}
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}  # fmt: skip
    with httpx.Client(base_url=f"{gw.url}/v1", timeout=10) as client:
        ids = []
        for stream in (True, False, True, False):
            resp = client.post("/chat/completions", json={**body, "stream": stream},
                               headers=auth)  # fmt: skip
            assert resp.status_code == 200, resp.text
            ids.append(resp.headers["x-request-id"])
        refused = client.post("/chat/completions", json=body,
                              headers={"authorization": f"Bearer {WRONG}"})  # fmt: skip
        assert refused.status_code == 401
        ids.append(refused.headers["x-request-id"])
        missing = client.post("/chat/completions", json={**body, "model": "nope"}, headers=auth)
        assert missing.status_code == 404
        ids.append(missing.headers["x-request-id"])
        assert client.get(f"{gw.url}/v1/models", headers=auth).status_code == 200

    assert wait_until(lambda: len(logs.access()) >= 7, timeout=5)
    access = logs.access()
    proxied = [line for line in access if line["path"] == "/v1/chat/completions"]
    assert [line["request_id"] for line in proxied] == ids  # exactly one line each, in order
    for line, stream in zip(proxied[:4], (True, False, True, False), strict=True):
        assert line["status"] == 200 and line["outcome"] == "ok"
        assert line["model"] == "fake-model" and line["adapter"] is None
        assert line["engine"] == "e0" and line["policy"] == "round-robin"
        assert line["stream"] is stream and line["key_id"] not in (None, "anonymous")
        # Plain answers carry the engine's usage; streams without include_usage count the
        # SSE events relayed (the role and finish chunks too: an estimate).
        assert line["prompt_tokens"] > 0
        assert line["completion_tokens"] == 4 if not stream else line["completion_tokens"] >= 4
        assert line["duration_s"] > 0
        assert (line["ttft_s"] is not None) is stream
    assert proxied[4]["status"] == 401 and proxied[4]["outcome"] == "refused"
    assert proxied[4]["key_id"] is None and proxied[4]["error"] == "Unauthorized"
    assert proxied[5]["status"] == 404 and proxied[5]["model"] == "nope"
    assert proxied[5]["key_id"] == proxied[0]["key_id"]
    models = [line for line in access if line["path"] == "/v1/models"]
    assert len(models) == 1 and models[0]["status"] == 200
    # Round-robin sends some requests to e1 first: its 503 is logged inside the request.
    failed = [line for line in logs.lines() if "e1 answered 503" in str(line["message"])]
    assert failed and all(line["request_id"] in ids for line in failed)
    assert KEY not in logs.text and WRONG not in logs.text
    assert KEY[6:] not in logs.text and WRONG[6:] not in logs.text


def test_redis_password_never_logged(
    start_engines: StartEngines, start_gateway: StartGateway, logs: Captured
) -> None:
    ((_, srv),) = start_engines(1)
    gw = start_gateway([srv.url], redis_url=f"redis://default:{REDIS_PASSWORD}@127.0.0.1:9/0",
                       redis={"retry_s": 0.05, "timeout_s": 0.2},
                       server={"access_log": True})  # fmt: skip
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        assert client.post(f"{gw.url}/v1/chat/completions", json=body).status_code == 200
        ready = client.get(f"{gw.url}/ready").text
    assert wait_until(lambda: "unavailable" in logs.text, timeout=5)
    assert "127.0.0.1:9" in logs.text  # the URL is logged, its password is not
    assert REDIS_PASSWORD not in logs.text and REDIS_PASSWORD not in ready


def test_access_log_off_registers_nothing() -> None:
    on = Services.build(gateway_settings(["http://127.0.0.1:9"], server={"access_log": True}))
    off = Services.build(gateway_settings(["http://127.0.0.1:9"]))  # the tests' default: off
    assert isinstance(on.access_log, AccessLog) and on.access_log in on.proxy.observers
    assert off.access_log is None and not off.proxy.observers
