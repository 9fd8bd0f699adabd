"""Leader election's pure part as tables: who may take the Lease, and the records written."""

from __future__ import annotations

from typing import cast

import pytest

from autoscale.kube import KubeApi
from autoscale.leader import (
    LeaderElector,
    LeaseRecord,
    Verdict,
    claimed,
    judge,
    record_from_json,
    record_to_json,
    released,
)

NOW = 1_000.0


@pytest.mark.parametrize(
    ("record", "identity", "expected"),
    [
        (None, "a", Verdict.CREATE),
        (LeaseRecord("a", 15, renew_time=NOW - 1), "a", Verdict.RENEW),
        (LeaseRecord("a", 15, renew_time=NOW - 100), "a", Verdict.RENEW),  # ours, even if late
        (LeaseRecord("", 1, renew_time=NOW), "b", Verdict.ACQUIRE),  # released
        (LeaseRecord("a", 15, renew_time=NOW - 1), "b", Verdict.WAIT),
        (LeaseRecord("a", 15, renew_time=NOW - 15), "b", Verdict.WAIT),  # exactly at expiry
        (LeaseRecord("a", 15, renew_time=NOW - 15.001), "b", Verdict.TAKE_OVER),
        (LeaseRecord("a", 15, renew_time=NOW + 30), "b", Verdict.WAIT),  # a clock ahead
        (LeaseRecord("a", 3, renew_time=NOW - 4), "b", Verdict.TAKE_OVER),
        (LeaseRecord("a", 15, renew_time=None), "b", Verdict.TAKE_OVER),  # never renewed
    ],
)
def test_judge(record: LeaseRecord | None, identity: str, expected: Verdict) -> None:
    assert judge(record, identity=identity, now=NOW) is expected


def test_claimed_counts_transitions_and_keeps_acquire_time_on_renewal() -> None:
    first = claimed(None, identity="a", now=NOW, duration_s=15)
    assert first == LeaseRecord("a", 15, renew_time=NOW, acquire_time=NOW, transitions=0)
    held = LeaseRecord("a", 15, renew_time=NOW, acquire_time=NOW, transitions=0,
                       resource_version="7")  # fmt: skip
    renewed = claimed(held, identity="a", now=NOW + 2, duration_s=15)
    assert (renewed.acquire_time, renewed.renew_time, renewed.transitions) == (NOW, NOW + 2, 0)
    assert renewed.resource_version == "7"  # the write is conditional on what was read
    taken = claimed(held, identity="b", now=NOW + 20, duration_s=15)
    assert (taken.holder, taken.acquire_time, taken.transitions) == ("b", NOW + 20, 1)


def test_released_clears_the_holder_and_shortens_the_lease() -> None:
    held = LeaseRecord("a", 15, renew_time=NOW, acquire_time=NOW - 50, transitions=3)
    out = released(held, now=NOW + 1)
    assert (out.holder, out.duration_s, out.renew_time, out.transitions) == ("", 1, NOW + 1, 3)
    assert judge(out, identity="b", now=NOW + 1) is Verdict.ACQUIRE


def test_wire_round_trip() -> None:
    record = LeaseRecord("gw-0_42", 15, renew_time=NOW + 0.123456, acquire_time=NOW,
                         transitions=2, resource_version="12")  # fmt: skip
    body = record_to_json(record, name="lease", namespace="ns")
    assert body["metadata"] == {"name": "lease", "namespace": "ns", "resourceVersion": "12"}
    assert body["spec"]["renewTime"] == "1970-01-01T00:16:40.123456Z"
    back = record_from_json(body)
    assert back.holder == "gw-0_42" and back.transitions == 2
    assert back.renew_time == pytest.approx(NOW + 0.123456, abs=1e-6)
    # what another client may write: an offset instead of Z, no fraction
    other = record_from_json(
        {"spec": {"holderIdentity": "x", "leaseDurationSeconds": 10,
                  "renewTime": "1970-01-01T01:16:40+01:00"}}
    )  # fmt: skip
    assert other.renew_time == NOW and other.acquire_time is None and other.holder == "x"
    assert record_from_json({"spec": {}}).holder == ""


@pytest.mark.parametrize(
    ("lease", "renew", "retry"),
    [(10, 10, 2), (15, 10, 10), (15, 10, 0), (2.5, 2, 0.5)],
)
def test_elector_refuses_unsafe_durations(lease: float, renew: float, retry: float) -> None:
    api = cast(KubeApi, object())
    with pytest.raises(ValueError):
        LeaderElector(api, name="l", namespace="ns", identity="a", lease_duration_s=lease,
                      renew_deadline_s=renew, retry_period_s=retry)  # fmt: skip
