"""Label and field selectors of the emulated API (pure; table tests)."""

from __future__ import annotations

import pytest

from enginesim.kube.selectors import (
    SelectorError,
    format_selector,
    parse_field_selector,
    parse_label_selector,
    selector_from_match,
)

LABELS = {"app": "engine", "tier": "gpu", "switchyard.io/model": "llama"}


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", LABELS, True),
        ("app=engine", LABELS, True),
        ("app==engine", LABELS, True),
        ("app=other", LABELS, False),
        ("app!=other", LABELS, True),
        ("app!=engine", LABELS, False),
        ("missing!=x", LABELS, True),  # a missing label matches !=
        ("tier in (gpu, cpu)", LABELS, True),
        ("tier in (cpu)", LABELS, False),
        ("missing in (a)", LABELS, False),
        ("tier notin (cpu)", LABELS, True),
        ("tier notin (gpu,cpu)", LABELS, False),
        ("missing notin (a)", LABELS, True),
        ("tier", LABELS, True),
        ("missing", LABELS, False),
        ("!missing", LABELS, True),
        ("!tier", LABELS, False),
        ("switchyard.io/model=llama", LABELS, True),
        ("app=engine,tier in (gpu),!canary,switchyard.io/model", LABELS, True),
        ("app=engine,tier in (cpu)", LABELS, False),
        ("app=engine", {}, False),
        ("app=", {"app": ""}, True),
    ],
)
def test_label_selector(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_label_selector(selector).matches(labels) is expected


@pytest.mark.parametrize("bad", ["app=engine,", "tier in (a", "=x", "a b", "app=@"])
def test_invalid_label_selectors_raise(bad: str) -> None:
    with pytest.raises(SelectorError):
        parse_label_selector(bad)


def test_match_labels_and_expressions_format_as_a_scale_selector() -> None:
    sel = selector_from_match(
        {
            "matchLabels": {"tier": "gpu", "app": "engine"},
            "matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["b", "a"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        }
    )
    text = format_selector(sel)
    assert text == "app=engine,tier=gpu,zone in (a,b),!canary"
    assert parse_label_selector(text) == sel
    assert sel.matches({"app": "engine", "tier": "gpu", "zone": "a"})
    assert not sel.matches({"app": "engine", "tier": "gpu", "zone": "c"})


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("metadata.name=p1", True),
        ("metadata.name==p1", True),
        ("metadata.name!=p1", False),
        ("status.phase=Running,metadata.namespace=default", True),
        ("status.phase=Pending", False),
        ("spec.nodeName=", True),  # a missing field reads as ""
    ],
)
def test_field_selector(selector: str, expected: bool) -> None:
    pod = {"metadata": {"name": "p1", "namespace": "default"}, "status": {"phase": "Running"}}
    assert parse_field_selector(selector).matches(pod) is expected
