"""Small helpers for the contract suite: SSE parsing, metric snapshots, error-envelope checks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.contract import recorded


@dataclass(frozen=True, slots=True)
class SSE:
    """A parsed ``text/event-stream`` body: JSON payloads and whether it ended with [DONE]."""

    content_type: str
    chunks: tuple[dict[str, Any], ...]
    done: bool
    events_after_done: int


def parse_sse(resp: httpx.Response, raw: str) -> SSE:
    """Parse vLLM's SSE framing: ``data: <json>\\n\\n`` events, terminated by ``data: [DONE]``."""
    chunks: list[dict[str, Any]] = []
    done = False
    after = 0
    for event in raw.split("\n\n"):
        if not event.strip():
            continue
        assert event.startswith("data: "), f"SSE event without 'data: ' prefix: {event!r}"
        assert "\n" not in event, f"multi-line SSE event: {event!r}"
        payload = event[len("data: ") :]
        if done:
            after += 1
        if payload == "[DONE]":
            done = True
            continue
        chunks.append(json.loads(payload))
    return SSE(resp.headers.get("content-type", ""), tuple(chunks), done, after)


def stream_post(client: httpx.Client, path: str, body: dict[str, Any]) -> SSE:
    with client.stream("POST", path, json=body) as resp:
        raw = resp.read().decode()
        assert resp.status_code == 200, raw
        return parse_sse(resp, raw)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """``/metrics`` parsed with prometheus_client: families by name and sample lookup."""

    families: dict[str, tuple[str, tuple[Sample, ...]]]

    def value(self, sample_name: str, **labels: str) -> float:
        """Sum of the samples called ``sample_name`` whose labels include ``labels``."""
        total = 0.0
        for _type, samples in self.families.values():
            for s in samples:
                if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


def scrape(client: httpx.Client) -> MetricsSnapshot:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    families = {
        fam.name: (fam.type, tuple(fam.samples))
        for fam in text_string_to_metric_families(resp.text)
    }
    return MetricsSnapshot(families)


def wait_for_metrics(
    client: httpx.Client,
    done: Callable[[MetricsSnapshot], bool],
    *,
    timeout_s: float = 10.0,
) -> MetricsSnapshot:
    """Scrape until ``done`` holds (metrics may trail the response by a step) or time out."""
    deadline = time.monotonic() + timeout_s
    snap = scrape(client)
    while not done(snap) and time.monotonic() < deadline:
        time.sleep(0.2)
        snap = scrape(client)
    return snap


def assert_error(
    resp: httpx.Response,
    *,
    status: int,
    type_: str,
    param: str | None,
    message: str | None = None,
    fragment: str | None = None,
) -> None:
    """The vLLM ≥ 0.10.1 error envelope with exactly these status/type/param/code (+message)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == recorded.ERROR_ENVELOPE_KEYS, body
    err = body["error"]
    assert set(err) == recorded.ERROR_KEYS, err
    assert (err["type"], err["param"], err["code"]) == (type_, param, status), err
    if message is not None:
        assert err["message"] == message
    if fragment is not None:
        assert fragment in err["message"], err["message"]
