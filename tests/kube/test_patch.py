"""PATCH bodies: RFC 7386 merge patches (and strategic merge on maps/scalars), RFC 6902."""

from __future__ import annotations

from typing import Any

import pytest

from enginesim.kube.patch import PatchError, apply_patch, json_patch, merge_patch

DOC: dict[str, Any] = {
    "metadata": {"name": "d", "labels": {"a": "1", "b": "2"}},
    "spec": {"replicas": 1, "list": [1, 2, 3]},
}


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"spec": {"replicas": 3}}, {**DOC, "spec": {"replicas": 3, "list": [1, 2, 3]}}),
        ({"metadata": {"labels": {"a": None, "c": "3"}}},
         {**DOC, "metadata": {"name": "d", "labels": {"b": "2", "c": "3"}}}),
        ({"spec": {"list": [9]}}, {**DOC, "spec": {"replicas": 1, "list": [9]}}),
        ({"spec": None}, {"metadata": DOC["metadata"]}),
    ],
)  # fmt: skip
def test_merge_patch(patch: dict[str, Any], expected: dict[str, Any]) -> None:
    assert merge_patch(DOC, patch) == expected
    assert DOC["spec"]["replicas"] == 1  # the target is not modified


@pytest.mark.parametrize(
    ("ops", "expected_spec"),
    [
        ([{"op": "replace", "path": "/spec/replicas", "value": 5}],
         {"replicas": 5, "list": [1, 2, 3]}),
        ([{"op": "add", "path": "/spec/list/-", "value": 4}],
         {"replicas": 1, "list": [1, 2, 3, 4]}),
        ([{"op": "add", "path": "/spec/list/0", "value": 0}],
         {"replicas": 1, "list": [0, 1, 2, 3]}),
        ([{"op": "remove", "path": "/spec/list/1"}], {"replicas": 1, "list": [1, 3]}),
        ([{"op": "test", "path": "/spec/replicas", "value": 1},
          {"op": "copy", "from": "/spec/replicas", "path": "/spec/min"}],
         {"replicas": 1, "list": [1, 2, 3], "min": 1}),
        ([{"op": "move", "from": "/spec/replicas", "path": "/spec/count"}],
         {"count": 1, "list": [1, 2, 3]}),
    ],
)  # fmt: skip
def test_json_patch(ops: list[dict[str, Any]], expected_spec: dict[str, Any]) -> None:
    assert json_patch(DOC, ops)["spec"] == expected_spec


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "replace", "path": "/spec/missing", "value": 1}],
        [{"op": "remove", "path": "/nothing"}],
        [{"op": "test", "path": "/spec/replicas", "value": 2}],
        [{"op": "frobnicate", "path": "/spec"}],
        [{"op": "add", "path": "/spec/list/9", "value": 1}],
        {"op": "add"},
    ],
)
def test_json_patch_errors(ops: Any) -> None:
    with pytest.raises(PatchError):
        json_patch(DOC, ops)


def test_apply_patch_by_content_type() -> None:
    body = {"spec": {"replicas": 2}}
    for ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json",
                  "application/merge-patch+json; charset=utf-8"):  # fmt: skip
        assert apply_patch(DOC, body, ctype)["spec"]["replicas"] == 2
    ops = [{"op": "replace", "path": "/spec/replicas", "value": 4}]
    assert apply_patch(DOC, ops, "application/json-patch+json")["spec"]["replicas"] == 4
    with pytest.raises(PatchError):
        apply_patch(DOC, body, "application/apply-patch+yaml")
    with pytest.raises(PatchError):
        apply_patch(DOC, ops, "application/merge-patch+json")
