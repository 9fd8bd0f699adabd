"""Shared constructors for routing table tests."""

from __future__ import annotations

from typing import Any

from routing.types import EndpointSnapshot


def ep(eid: str, **kw: Any) -> EndpointSnapshot:
    return EndpointSnapshot(id=eid, url=f"http://{eid}", **kw)


def eps(n: int, **kw: Any) -> list[EndpointSnapshot]:
    return [ep(f"e{i}", **kw) for i in range(n)]
