"""kube-sim pods pick the shared KV tier from their annotations (docs/kube-sim.md)."""

from __future__ import annotations

from typing import Any

import pytest

from enginesim.kube.controller import (
    ANNOTATION_KV_TIER,
    ANNOTATION_KV_TIER_ASYNC,
    ANNOTATION_PROFILE,
    Controller,
    ControllerConfig,
)
from enginesim.kube.store import Store


def _pod(annotations: dict[str, str]) -> dict[str, Any]:
    meta = {"name": "p", "namespace": "default", "uid": "u"}
    return {"metadata": {**meta, "annotations": {ANNOTATION_PROFILE: "cpu-smollm2", **annotations}}}


@pytest.mark.parametrize(
    ("annotations", "url", "is_async"),
    [
        ({}, None, False),
        ({ANNOTATION_KV_TIER: "redis://127.0.0.1:6390/0"}, "redis://127.0.0.1:6390/0", False),
        ({ANNOTATION_KV_TIER: "redis://h:1/0", ANNOTATION_KV_TIER_ASYNC: "True"}, "redis://h:1/0",
         True),
        ({ANNOTATION_KV_TIER: ""}, None, False),
    ],
)  # fmt: skip
def test_kv_tier_annotations(annotations: dict[str, str], url: str | None, is_async: bool) -> None:
    controller = Controller(Store(), ControllerConfig())
    cfg, _profile = controller._engine_config(_pod(annotations), 0)
    assert (cfg.kv_tier, cfg.kv_tier_async) == (url, is_async)
