"""Which policies make the gateway hash prompts: only those with a plugin reading prefixes."""

from __future__ import annotations

import pytest

from routing import build_policies, build_profile, builtin_policies


@pytest.mark.parametrize(
    ("name", "reads"),
    [
        ("prefix-cache", True),
        ("round-robin", False),
        ("least-request", False),
        ("random", False),
        ("session-affinity", False),
        ("fairness", False),
        ("least-kv-cache", False),
    ],
)
def test_builtin_policy_reads_prefix(name: str, reads: bool) -> None:
    assert build_policies(builtin_policies())[name].reads_prefix is reads


def test_profile_with_the_prefix_scorer_reads_prefix() -> None:
    spec = {"scorers": [{"type": "prefix-cache", "weight": 1.0}, {"type": "least-request"}]}
    assert build_profile("mine", spec).reads_prefix
    assert not build_profile("plain", {"scorers": [{"type": "least-request"}]}).reads_prefix
